"""The columns and Arrow schema of every Parquet table recdist reads or writes (README's schema tables).

The one place a column is named: models declare the features they read (Model.inputs) with the names here, and
batch inference adds the role columns (ROLE_COLUMNS) in the types of SCORED_EXTRA. Scored tables keep the
prepared ratings' columns (RATINGS) and add float32 prediction columns; analyst tables under RUN/outputs/ use
original ids (user_id, movie_id) and titles.
"""

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

#: The index columns every ratings-shaped table starts with.
INDEX_COLUMNS = ("user_idx", "item_idx")

# ------------------------------------------------------------------------------------------- scored tables
# Row features stages 2 and 3 read by name (recdist.models.batch.Batch.feature).

MF_PRED = "mf_pred"
"""Stage 1's prediction of the row, clipped to the rating scale."""
ERROR = "error"
"""(rating - mf_pred)^2: stage 2's target."""
PRED_ERROR = "pred_error"
"""Stage 2's predicted squared error of stage 1 (low = reliable)."""
PRED_RATING = "pred_rating"
"""Stage 3's (or the single model's) final prediction."""
#: The session context stage 1's inference writes per row (recdist.infer.session): per window (short, long),
#: the sum of the residuals of the user's training ratings around it, the sum of their squares, their count.
SESSION_COLUMNS = (
    "sess_short_sum",
    "sess_short_sq",
    "sess_short_n",
    "sess_long_sum",
    "sess_long_sq",
    "sess_long_n",
)

#: Columns each scoring role adds to a scored table (besides the `cold` flag).
ROLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "mf": (MF_PRED, ERROR),
    "reliability": (PRED_ERROR,),
    "rating": (PRED_RATING,),
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
        pa.field(MF_PRED, pa.float32()),
        pa.field(ERROR, pa.float32()),
        pa.field("cold", pa.bool_()),  # the user or the movie had no training rating: fallback used
        # stage 1's session context (recdist/infer/session.py): over the user's training ratings within the
        # short / long window before the row, the sum of their stage-1 residuals, of the squares, and the count
        *(pa.field(name, pa.float32()) for name in SESSION_COLUMNS),
        pa.field(PRED_ERROR, pa.float32()),
        pa.field(PRED_RATING, pa.float32()),
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
        pa.field("rank_score", pa.float32()),  # what the list is ordered by (pipeline.rank_order)
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
