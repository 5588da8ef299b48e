"""Batch inference with Ray Data, recommendations and similar items."""
