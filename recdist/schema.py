"""The Arrow schema of every Parquet table recdist reads or writes (documented in README's schema table)."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

SPLIT_TYPE = pa.dictionary(pa.int8(), pa.string())
SPLITS = ("train", "val", "test")

#: Ratings as parsed from any source, before preparation (original ids).
RAW_RATINGS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64()),  # seconds since epoch; null where the source has none
    ]
)

#: Movies as parsed from a source's movies file.
RAW_ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("genres", pa.string()),  # pipe-separated, as MovieLens writes them
    ]
)

#: Prepared ratings shards: ratings/part-NNNNN.parquet.
RATINGS = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64()),
        pa.field("split", SPLIT_TYPE, nullable=False),
    ]
)

#: users.parquet: contiguous index <-> original id.
USERS = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("n_train", pa.int32(), nullable=False),  # ratings in the train split
    ]
)

#: items.parquet: contiguous index <-> original id, with titles and genres where the source has them.
ITEMS = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("genres", pa.string()),
        pa.field("n_train", pa.int32(), nullable=False),
    ]
)
