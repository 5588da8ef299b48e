"""Sources (GroupLens registry, downloads, parsers), synthetic ratings, and preparation into Parquet shards."""
