"""The columns and Arrow schema of every Parquet table recdist reads or writes (README's schema tables).

The one place a column is named: models declare the features they read (Model.inputs) with the names here, and
batch inference adds the role columns (ROLE_COLUMNS) in the types of SCORED_EXTRA. Scored tables keep the
prepared ratings' columns (RATINGS) and add float32 prediction columns; analyst tables under RUN/outputs/ use
original ids (user_id, movie_id) and titles.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        pa.field("n_ratings", pa.int32()),  # ratings in every split
        pa.field("fingerprint", pa.uint64()),  # of every rating (recdist.data.idmaps.fingerprints)
        pa.field("train_fingerprint", pa.uint64()),  # of the training ratings
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

# ------------------------------------------------------------------------------------------ analyst tables
# RUN/outputs/<table>/: one folder per table (OUTPUT_TABLES), every column described (Arrow field metadata,
# `description`), the same text in outputs/SCHEMA.md and README (recdist/tables.py renders them).

DESCRIPTION = b"description"
EXPECTED_ABS_ERROR = "expected_abs_error"
"""The reliability of a prediction as analysts read it: the expected absolute error in stars (lower = more
reliable), sqrt(2/pi x pred_error), what |rating - prediction| averages to when the error is normal with stage 2's
predicted squared error as its variance."""


def _col(name: str, kind: pa.DataType, description: str, *, nullable: bool = True) -> pa.Field:
    return pa.field(name, kind, nullable=nullable, metadata={DESCRIPTION: description.encode()})


def _ranked_list(
    owner: tuple[str, str], rank: str, movie: tuple[str, str], title: tuple[str, str]
) -> list[pa.Field]:
    """The first columns of a top-N table, each (name, description) but `rank`'s: whom the list is for, the
    position in it (1 first), the movie there and its title."""
    return [
        _col(owner[0], pa.int64(), owner[1], nullable=False),
        _col("rank", pa.int16(), rank, nullable=False),
        _col(movie[0], pa.int64(), movie[1], nullable=False),
        _col(title[0], pa.string(), title[1]),
    ]


PREDICTIONS = pa.schema(
    [
        _col("user_id", pa.int64(), "original user id (as in the source)", nullable=False),
        _col("movie_id", pa.int64(), "original movie id (as in the source)", nullable=False),
        _col("title", pa.string(), "movie title (null without a movies file)"),
        _col(
            "split",
            SPLIT_TYPE,
            "train / val / test; the partition folder (split=test/), not a column inside the files",
            nullable=False,
        ),
        _col("rated_at", pa.timestamp("ms", tz="UTC"), "when the rating was given (null where the source has none)"),
        _col("rating", pa.float32(), "the rating given, in stars", nullable=False),
        _col(
            "pred_rating",
            pa.float32(),
            "final predicted rating (stage 3, or the single model), clipped to the rating scale",
            nullable=False,
        ),
        _col(
            EXPECTED_ABS_ERROR,
            pa.float32(),
            "reliability: expected absolute error of the prediction in stars, lower = more reliable (stage 2; "
            "null for a single-model run)",
        ),
        _col("mf_pred", pa.float32(), "stage 1's predicted rating (null for a single-model run)"),
        _col(
            "cold",
            pa.bool_(),
            "the user or the movie had no training rating: the predictions are the fallback (global mean + the "
            "known side's bias)",
            nullable=False,
        ),
    ]
)

RECOMMENDATIONS = pa.schema(
    [
        *_ranked_list(
            ("user_id", "original user id (every user of the data)"),
            "1 = best: rank_score descending, then candidate_score descending",
            ("movie_id", "original movie id"),
            ("title", "movie title"),
        ),
        _col("score", pa.float32(), "predicted rating (final stage), clipped to the rating scale", nullable=False),
        _col(
            EXPECTED_ABS_ERROR,
            pa.float32(),
            "reliability: expected absolute error of the predicted rating in stars, lower = more reliable (null "
            "for a single-model run)",
        ),
        _col(
            "rank_score",
            pa.float32(),
            "what the list is ordered by (pipeline.outputs.rank_order; the blend: P(rated) x P(rating >= "
            "threshold)), unclipped",
        ),
        _col(
            "candidate_score",
            pa.float32(),
            "the candidate model's score (EASE / iALS / stage 1's MF), which breaks ties of rank_score; null for "
            "popularity candidates",
        ),
    ]
)

ITEM_FACTORS = pa.schema(
    [
        _col("movie_id", pa.int64(), "original movie id", nullable=False),
        _col("title", pa.string(), "movie title"),
        _col("genres", pa.string(), "pipe-separated genres, as MovieLens writes them"),
        _col("n_train", pa.int32(), "training ratings of the movie", nullable=False),
        _col("bias", pa.float32(), "b_i of stage 1: rated above the global mean and users' biases", nullable=False),
        _col("pc1", pa.float32(), "first principal component of the factors (most-rated movie >= 0)", nullable=False),
        _col("pc2", pa.float32(), "second principal component of the factors", nullable=False),
        _col("factors", pa.list_(pa.float32()), "q_i of stage 1 (rank floats)", nullable=False),
    ]
)

USER_FACTORS = pa.schema(
    [
        _col("user_id", pa.int64(), "original user id", nullable=False),
        _col("n_train", pa.int32(), "training ratings of the user", nullable=False),
        _col("bias", pa.float32(), "b_u of stage 1: how much above the global mean the user rates", nullable=False),
        _col("factors", pa.list_(pa.float32()), "p_u of stage 1 (rank floats); rating ~ mean + b_u + b_i + p_u.q_i",
             nullable=False),
    ]
)

SIMILAR_ITEMS = pa.schema(
    [
        *_ranked_list(
            ("movie_id", "the movie"), "1 = most similar", ("similar_movie_id", "the neighbour"),
            ("similar_title", "the neighbour's title"),
        ),
        _col("cosine", pa.float32(), "cosine similarity of the two movies' stage-1 factors", nullable=False),
    ]
)

RELIABILITY_DECILES = pa.schema(
    [
        _col("decile", pa.int8(), "1 = lowest expected_abs_error (most reliable) ... 10 = highest", nullable=False),
        _col("n", pa.int64(), "test ratings in the decile", nullable=False),
        _col("expected_abs_error_min", pa.float64(), "lowest expected_abs_error in the decile", nullable=False),
        _col("expected_abs_error_max", pa.float64(), "highest expected_abs_error in the decile", nullable=False),
        _col("mean_expected_abs_error", pa.float64(), "predicted: mean expected_abs_error (stars)", nullable=False),
        _col("mae", pa.float64(), "observed: mean absolute error of the final prediction (stars)", nullable=False),
        _col("mf_mae", pa.float64(), "observed: stage 1's mean absolute error on the same ratings"),
        _col("rmse", pa.float64(), "observed: RMSE of the final prediction", nullable=False),
        _col("mf_rmse", pa.float64(), "observed: stage 1's RMSE on the same ratings"),
    ]
)


@dataclass(frozen=True)
class OutputTable:
    """One analyst table: RUN/outputs/<name>/ holds its Parquet files."""

    name: str
    schema: pa.Schema
    row: str
    """What one row is."""
    partition_by: tuple[str, ...] = ()
    """Hive partition columns (folders name=value/; not stored inside the files)."""
    sort_by: tuple[str, ...] = ()
    """The order of rows within each file."""
    only: str = ""
    """When the table is written only for some runs."""

    def file_schema(self) -> pa.Schema:
        """The schema inside each file: the partition columns are in the folder names."""
        drop = [self.schema.get_field_index(c) for c in self.partition_by]
        out = self.schema
        for i in sorted(drop, reverse=True):
            out = out.remove(i)
        return out


OUTPUT_TABLES: dict[str, OutputTable] = {
    t.name: t
    for t in (
        OutputTable(
            "predictions",
            PREDICTIONS,
            "rating of every split",
            partition_by=("split",),
            sort_by=("user_id", "movie_id"),
        ),
        OutputTable(
            "recommendations",
            RECOMMENDATIONS,
            "user x rank: the top pipeline.outputs.top_n movies the user has not rated",
            sort_by=("user_id", "rank"),
        ),
        OutputTable("item_factors", ITEM_FACTORS, "movie with training ratings", sort_by=("movie_id",),
                    only="models with factors"),
        OutputTable("user_factors", USER_FACTORS, "user with training ratings", sort_by=("user_id",),
                    only="models with factors"),
        OutputTable(
            "similar_items",
            SIMILAR_ITEMS,
            "movie x rank: the pipeline.outputs.similar_k nearest movies by cosine of factors",
            sort_by=("movie_id", "rank"),
            only="models with factors",
        ),
        OutputTable(
            "reliability_deciles",
            RELIABILITY_DECILES,
            "decile of expected_abs_error on the test ratings (calibration)",
            sort_by=("decile",),
            only="rncf",
        ),
    )
}
"""Every analyst table, in the order SCHEMA.md lists them."""
