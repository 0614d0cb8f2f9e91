"""Evaluation: hierarchy metrics and text-to-code retrieval."""
