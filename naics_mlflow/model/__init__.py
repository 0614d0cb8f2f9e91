"""Hyperbolic embedding model: Lorentz geometry, mixture of experts and contrastive loss."""

CHANNELS = ("title", "description", "excluded", "examples")
"""The four texts of a code, each encoded with its own LoRA adapter, in this order."""

SEMANTIC_CHANNELS = ("title", "description", "examples")
"""The channels that say what a code *is*; their unit mean is the fusion's skip path (see
``MultiChannelEncoder``). The cross-references are left out: they name other industries."""
