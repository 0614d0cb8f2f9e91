"""Hyperbolic embedding model: Lorentz geometry, mixture of experts and contrastive loss."""

CHANNELS = ("title", "description", "excluded", "examples")
"""The four texts of a code, each encoded with its own LoRA adapter, in this order."""
