"""Answers from a finished run: top-N movies for a known user, for a new user given a few ratings (folded into
the MF), and the movies most similar to a movie.

Known users and movies are answered from the run's tables (outputs/recommendations/, outputs/similar_items/);
asking for more rows than were stored recomputes with the run's models.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import polars as pl
import pyarrow.compute as pc
import torch

from recdist import integrity, storage, tables
from recdist.errors import DataError, RecdistError, StorageError
from recdist.infer.outputs import CANDIDATE_MODEL, analyst_recommendations, ranker_for
from recdist.infer.ranker import recommendable
from recdist.infer.topn import Csr, cosine_neighbours, fold_in, mf_scores, top_k_of
from recdist.manifest import RunModels

COLUMNS = ["rank", "movie_id", "title", "score", "expected_abs_error", "rank_score", "candidate_score"]


def recommend(run: str, *, user_id: int | None = None, ratings: str | None = None, n: int = 10) -> pl.DataFrame:
    """Top-n unseen movies for the user `user_id` of the run, or for a new user from a ratings file.

    Columns: rank, movie_id, title, score (predicted rating), expected_abs_error (in stars; lower is more
    reliable; empty for a folded-in user, whom stage 2 has never seen), rank_score, candidate_score.
    """
    if (user_id is None) == (ratings is None):
        raise RecdistError("give exactly one of a user id or a ratings file")
    if n < 1:
        raise RecdistError(f"n must be at least 1, got {n}")
    outputs, manifest = _outputs(run)
    if user_id is not None:
        return _known_user(run, outputs, manifest, int(user_id), n)
    return _new_user(run, manifest, ratings or "", n)


def similar(run: str, movie_id: int, k: int = 10) -> pl.DataFrame:
    """The k movies nearest to `movie_id` by cosine of the stage-1 item factors: rank, movie_id, title, cosine."""
    outputs, manifest = _outputs(run)
    stored_uri = tables.table_dir(outputs, "similar_items")
    if not storage.exists(stored_uri):
        raise DataError(
            "this run has no item factors (its model has no mf_tables())",
            where=run,
            fix="similar movies need an MF-family model (rncf, or single with biased_mf / mf_residual_mlp)",
        )
    stored = storage.read_parquet(stored_uri, filters=pc.field("movie_id") == movie_id)
    if stored.num_rows >= k:
        frame = pl.from_arrow(stored).sort("rank").head(k)
        return frame.select("rank", movie_id="similar_movie_id", title="similar_title", cosine="cosine")
    factors = pl.from_arrow(storage.read_parquet(tables.table_dir(outputs, "item_factors")))
    hit = factors.with_row_index("row").filter(pl.col("movie_id") == movie_id)
    min_ratings = int(manifest.get("similar_min_ratings", 1))
    _check_movie(run, movie_id, factors, hit, min_ratings)
    q = torch.from_numpy(np.stack(factors["factors"].to_numpy()).astype(np.float32))
    allowed = torch.from_numpy(factors["n_train"].to_numpy() >= min_ratings)
    cos, idx = cosine_neighbours(q, torch.tensor([int(hit["row"][0])]), k, allowed=allowed)
    keep = torch.isfinite(cos[0])
    rows = factors[idx[0][keep].numpy()]
    return pl.DataFrame(
        {
            "rank": np.arange(1, len(rows) + 1, dtype=np.int16),
            "movie_id": rows["movie_id"],
            "title": rows["title"],
            "cosine": cos[0][keep].numpy(),
        }
    )


def _check_movie(run: str, movie_id: int, factors: pl.DataFrame, hit: pl.DataFrame, min_ratings: int) -> None:
    """Refuse a movie the run has no factors for, or too few training ratings for its factors to mean much,
    naming the run's most-rated movies to try instead (ids have gaps: synthetic ones as ml-20m's)."""
    n_train = int(hit["n_train"][0]) if hit.height else 0
    if hit.height and n_train >= min_ratings:
        return
    top = factors.sort("n_train", descending=True).head(5)
    names = ", ".join(
        f"{r['movie_id']} ({r['title'] or 'untitled'}, {r['n_train']:,} ratings)" for r in top.iter_rows(named=True)
    )
    fix = f"pick a movie with >= {min_ratings} training ratings (outputs/item_factors/), e.g. {names}"
    if not hit.height:
        raise DataError(f"movie {movie_id} is not in this run: no training rating (or no such id)", where=run, fix=fix)
    raise DataError(
        f"movie {movie_id} has {n_train} training rating(s), fewer than the run's similar_min_ratings "
        f"({min_ratings}): its factors are mostly initial noise, so its neighbours would mean nothing",
        where=run,
        fix=fix,
    )


def _outputs(run: str) -> tuple[str, dict[str, Any]]:
    outputs = storage.join(run, "outputs")
    if not storage.is_committed(outputs, tables.SUCCESS):
        raise StorageError(
            f"{run} has no finished outputs (outputs/{tables.SUCCESS} missing; outputs written before the "
            "folder-per-table layout have none)",
            fix="run `recdist pipeline` to the end first (re-running resumes where it stopped and redoes old outputs)",
        )
    manifest = storage.read_json(storage.join(outputs, storage.MANIFEST))
    redo = f"recdist pipeline --config CONFIG --out {run}"
    integrity.verify(
        outputs,
        fix=f"redo the outputs: {redo} --from outputs",
        stale_fix=f"finish the run: {redo} (it redoes the stale stages), or ask another run directory",
    )
    if "models" not in manifest:  # outputs written by hand (tests) name no dataset
        return outputs, manifest
    data = run_models(run, manifest).data
    inside = storage.absolute(data).startswith(storage.absolute(run).rstrip("/") + "/")
    again = f"{redo} --from prepare" if inside else f"prepare {data} again (--overwrite), then {redo} --from mf"
    integrity.verify(data, fix=f"the run's dataset is damaged: {again}")
    return outputs, manifest


def run_models(run: str, manifest: dict[str, Any]) -> RunModels:
    """The RunModels recorded in the outputs manifest, relative paths resolved under the run directory."""
    return RunModels.model_validate(manifest["models"]).resolved(run)


def _known_user(run: str, outputs: str, manifest: dict[str, Any], user_id: int, n: int) -> pl.DataFrame:
    from recdist.data.dataset import read_users

    models = run_models(run, manifest)
    stored = storage.read_parquet(tables.table_dir(outputs, "recommendations"), filters=pc.field("user_id") == user_id)
    if stored.num_rows and n <= int(manifest.get("top_n", 0)):
        return pl.from_arrow(stored).sort("rank").head(n).select([c for c in COLUMNS if c in stored.column_names])
    users = read_users(models.data).filter(pl.col("user_id") == user_id)
    if users.height == 0:
        raise DataError(
            f"user {user_id} is not in this run's data",
            where=run,
            fix="recommend for a new user with --ratings FILE (movieId,rating)",
        )
    user_idx = int(users["user_idx"][0])
    seen = _user_items(models.scored, user_idx)
    exclude = Csr.build(torch.zeros(len(seen), dtype=torch.long), torch.from_numpy(seen), 1)
    saved = storage.join(outputs, CANDIDATE_MODEL)  # the candidate model the stored lists were ranked with
    ranker = ranker_for(models, _min_ratings(manifest), ranking=manifest.get("ranking"),
                        candidate_model=saved if storage.exists(saved) else None)  # fmt: skip
    frame = ranker.rank(
        torch.tensor([user_idx]),
        n,
        candidates=max(n, int(manifest.get("candidates", 100))),
        exclude=_shift(exclude, user_idx),
    )
    return _titled(analyst_recommendations(frame), models.data)


def _new_user(run: str, manifest: dict[str, Any], ratings: str, n: int) -> pl.DataFrame:
    from recdist.data.dataset import read_items
    from recdist.models.io import load_model

    models = run_models(run, manifest)
    mf = load_model(models.mf) if models.mf is not None else None
    tables = mf.mf_tables() if mf is not None else None
    if tables is None:
        raise DataError(
            "this run's model has no factors to fold a new user into",
            where=run,
            fix="use an rncf run or a single MF-family model",
        )
    if tables.link != "identity":
        raise DataError(f"folding a user into a {type(mf).__name__} (non-linear link) is not supported", where=run)
    items = read_items(models.data)
    given = _read_ratings(ratings).join(items.select("item_id", "item_idx"), left_on="movie_id", right_on="item_id")
    if given.height == 0:
        raise DataError(
            "none of the rated movies is known to this run",
            where=ratings,
            fix="use MovieLens movieIds that appear in the run's data (outputs/item_factors/)",
        )
    f = {k: v.float() for k, v in tables.tensors().items()}
    mean = tables.mu
    item_idx = torch.from_numpy(given["item_idx"].to_numpy().astype(np.int64))
    p, b_u = fold_in(
        f["item_factors"],
        f["item_bias"],
        mean,
        item_idx,
        torch.from_numpy(given["rating"].to_numpy().astype(np.float32)),
        tables.reg,
    )
    user = {
        "user_factors": p.unsqueeze(0),
        "user_bias": torch.tensor([b_u]),
        "item_factors": f["item_factors"],
        "item_bias": f["item_bias"],
    }
    exclude = Csr.build(torch.zeros(len(item_idx), dtype=torch.long), item_idx, 1)
    allowed = recommendable(items["n_train"].to_numpy(), _min_ratings(manifest))
    scores, top = top_k_of(partial(mf_scores, user, mean), torch.tensor([0]), n, exclude=exclude, allowed=allowed)
    lo, hi = mf.dims.rating_min, mf.dims.rating_max
    keep = torch.isfinite(scores[0])
    frame = pl.DataFrame(
        {
            "rank": np.arange(1, int(keep.sum()) + 1, dtype=np.int16),
            "item_idx": top[0][keep].numpy().astype(np.int32),
            "score": scores[0][keep].clamp(lo, hi).numpy(),
            "rank_score": scores[0][keep].numpy(),  # a new user: ranked by stage 1's score
            "candidate_score": scores[0][keep].numpy(),
            "expected_abs_error": pl.Series([None] * int(keep.sum()), dtype=pl.Float32),
        }
    )
    return _titled(frame, models.data)


def _min_ratings(manifest: dict[str, Any]) -> int:
    """The run's recommend_min_ratings (runs written before it existed: 1)."""
    return int(manifest.get("recommend_min_ratings", 1))


def _read_ratings(uri: str) -> pl.DataFrame:
    """A new user's ratings: CSV or Parquet with a movie id column (movieId / movie_id / item_id) and rating."""
    raw = storage.read_bytes(uri)
    import io

    frame = pl.read_parquet(io.BytesIO(raw)) if uri.endswith(".parquet") else pl.read_csv(io.BytesIO(raw))
    movie = next((c for c in ("movieId", "movie_id", "item_id", "itemId") if c in frame.columns), None)
    if movie is None or "rating" not in frame.columns:
        raise DataError(
            f"the ratings file needs a movieId and a rating column (found: {', '.join(frame.columns)})",
            where=uri,
            fix="write it as CSV with a header: movieId,rating",
        )
    return frame.select(movie_id=pl.col(movie).cast(pl.Int64), rating=pl.col("rating").cast(pl.Float32))


def _user_items(scored: str, user_idx: int) -> np.ndarray:
    """Every movie the user rated in any split (excluded from recommendations)."""
    from recdist.data.dataset import shards

    parts = [s.read(["item_idx"], filters=pc.field("user_idx") == user_idx) for s in shards(scored)]
    return np.concatenate([p["item_idx"].to_numpy() for p in parts]).astype(np.int64)


def _shift(csr: Csr, user_idx: int) -> Csr:
    """A one-row Csr moved to row `user_idx` (rows before it empty)."""
    indptr = torch.cat([torch.zeros(user_idx, dtype=torch.long), csr.indptr])
    return Csr(indptr, csr.indices)


def _titled(frame: pl.DataFrame, data: str) -> pl.DataFrame:
    from recdist.data.dataset import read_items

    items = read_items(data).select("item_idx", movie_id="item_id", title="title")
    return frame.join(items, on="item_idx", how="left").sort("rank").select(COLUMNS)
