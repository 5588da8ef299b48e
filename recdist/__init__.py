"""recdist: distributed collaborative filtering on MovieLens with Ray Train, PyTorch, Polars and Parquet."""

__version__ = "0.1.0"
