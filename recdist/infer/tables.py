"""Arrow schemas of the tables batch inference and the pipeline write (the README schema table lists them).

Scored tables keep the prepared ratings' columns (recdist.schema.RATINGS) and add float32 prediction
columns; analyst tables under RUN/outputs/ use original ids (user_id, movie_id) and titles.
"""

from __future__ import annotations

import pyarrow as pa

from recdist.models.reliability import SESSION_COLUMNS
from recdist.schema import SPLIT_TYPE

#: Columns each scoring role adds to a scored table (besides the `cold` flag).
ROLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "mf": ("mf_pred", "error"),
    "reliability": ("pred_error",),
    "rating": ("pred_rating",),
}

#: pyarrow.parquet writer options of scored tables (intermediates between stages): snappy, dictionary pages only
#: for `split` and `rating`, statistics only on the indices (readers filter on them). Writing is the slowest
#: part of a scoring pass; dictionary-encoding every column with zstd (the defaults) made it 2x slower.
SCORED_PARQUET: dict = {
    "compression": "snappy",
    "use_dictionary": ["split", "rating"],
    "write_statistics": ["user_idx", "item_idx"],
}

#: Extra columns of a scored table, in the order they appear when all three stages have run.
SCORED_EXTRA = pa.schema(
    [
        pa.field("mf_pred", pa.float32()),  # stage 1 prediction, clipped to the rating scale
        pa.field("error", pa.float32()),  # (rating - mf_pred)^2: stage 2's target
        pa.field("cold", pa.bool_()),  # the user or the movie had no training rating: fallback used
        # stage 1's session context (recdist/infer/session.py): over the user's training ratings within the
        # short / long window before the row, the sum of their stage-1 residuals, of the squares, and the count
        *(pa.field(name, pa.float32()) for name in SESSION_COLUMNS),
        pa.field("pred_error", pa.float32()),  # stage 2: expected squared error (low = reliable)
        pa.field("pred_rating", pa.float32()),  # stage 3 (or the single model): final prediction
    ]
)

#: outputs/predictions/part-*.parquet: one row per rating of every split.
PREDICTIONS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("movie_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("split", SPLIT_TYPE, nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("pred_rating", pa.float32(), nullable=False),
        pa.field("pred_error", pa.float32()),  # null for a single-model pipeline
        pa.field("mf_pred", pa.float32()),  # null for a single-model pipeline
        pa.field("cold", pa.bool_(), nullable=False),
    ]
)

#: outputs/recommendations.parquet: top-N movies per user that the user has not rated in any split.
RECOMMENDATIONS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),  # 1 = best
        pa.field("movie_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("score", pa.float32(), nullable=False),  # predicted rating (final stage)
        pa.field("reliability", pa.float32()),  # predicted squared error: lower is more reliable
    ]
)

#: outputs/item_factors.parquet: one row per movie with training ratings.
ITEM_FACTORS = pa.schema(
    [
        pa.field("movie_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("genres", pa.string()),
        pa.field("n_train", pa.int32(), nullable=False),
        pa.field("bias", pa.float32(), nullable=False),  # b_i of stage 1: rating above the global mean
        pa.field("pc1", pa.float32(), nullable=False),  # first principal component of the factors
        pa.field("pc2", pa.float32(), nullable=False),
        pa.field("factors", pa.list_(pa.float32()), nullable=False),  # q_i of stage 1
    ]
)

#: outputs/similar_items.parquet: the k nearest movies by cosine of factors, per movie.
SIMILAR_ITEMS = pa.schema(
    [
        pa.field("movie_id", pa.int64(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("similar_movie_id", pa.int64(), nullable=False),
        pa.field("similar_title", pa.string()),
        pa.field("cosine", pa.float32(), nullable=False),
    ]
)

#: outputs/reliability_deciles.parquet: test error by decile of predicted error (1 = most reliable).
RELIABILITY_DECILES = pa.schema(
    [
        pa.field("decile", pa.int8(), nullable=False),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("mean_pred_error", pa.float64(), nullable=False),
        pa.field("mse", pa.float64(), nullable=False),  # observed mean squared error (calibration)
        pa.field("rmse", pa.float64(), nullable=False),
        pa.field("mae", pa.float64(), nullable=False),
        pa.field("mf_rmse", pa.float64()),  # stage 1's test RMSE on the same rows, for comparison
    ]
)
