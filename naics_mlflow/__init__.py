"""naics-embedder: hyperbolic embeddings of the NAICS 2022 taxonomy, tracked in MLflow."""

__version__ = "0.3.0"
