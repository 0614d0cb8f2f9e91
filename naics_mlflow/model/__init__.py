"""Hyperbolic embedding model: Lorentz geometry, mixture of experts and contrastive loss."""
