"""The main job end to end on a local Ray cluster: outputs and their schemas, no test leakage, resume after a
stop, stale stages, --from, run directories, cold start, the report, recommend/similar, a one-model pipeline.

Planted data (given train/val/test files, ~5k ratings): half the users rate with little noise and half with
much (and a star lower, so stage 1's user bias carries it), so the reliability stage has a known answer; one
user and one movie appear only in the test file (cold).
Ray Train runs cost seconds each on two cores, so the runs are few (two RNCF runs, one single-model run) and
each test asserts much about them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SMALL_RUN, reader_counts
from safetensors.torch import load_file

from recdist import schema, storage, tables
from recdist.config import Config, load_config
from recdist.errors import ConfigError, IntegrityError, StorageError
from recdist.infer.outputs import CANDIDATE_MODEL
from recdist.pipeline import STOP_AFTER_ENV, run_pipeline

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_USERS, N_ITEMS, PER_USER = 150, 90, 32
COLD_USER, COLD_MOVIE = 777_777, 999_999  # only in the test file
QUIET_SD, NOISY_SD = 0.15, 1.1  # rating noise of even / odd users: the planted reliability signal


def user_id(u: int) -> int:
    return 10 + 3 * u  # original ids are not the indices


def movie_id(i: int) -> int:
    return 1000 + 7 * i


def write_planted(root: Path, *, flip_test: bool = False) -> dict[str, str]:
    """train/val/test CSVs and movies.csv of a planted rank-3 model; `flip_test` mirrors every test rating."""
    rng = np.random.default_rng(0)
    p, q = rng.normal(0, 0.6, (N_USERS, 3)), rng.normal(0, 0.6, (N_ITEMS, 3))
    bu, bi = rng.normal(0, 0.3, N_USERS), rng.normal(0, 0.4, N_ITEMS)
    user = np.repeat(np.arange(N_USERS), PER_USER)
    item = np.concatenate([rng.choice(N_ITEMS, PER_USER, replace=False) for _ in range(N_USERS)])
    noisy = user % 2 == 1  # erratic raters, who also rate a star lower: their bias carries their noise level
    sd = np.where(noisy, NOISY_SD, QUIET_SD)
    rating = 3.8 - noisy + bu[user] + bi[item] + (p[user] * q[item]).sum(1) + rng.normal(0, 1, len(user)) * sd
    frame = pl.DataFrame(
        {
            "userId": [user_id(u) for u in user],
            "movieId": [movie_id(i) for i in item],
            "rating": np.clip(np.round(rating * 2) / 2, 0.5, 5.0),
            "timestamp": np.arange(len(user)) + 1_000_000,
            "split": rng.choice(["train", "val", "test"], len(user), p=[0.8, 0.1, 0.1]),
        }
    )
    cold = pl.DataFrame(
        {
            "userId": [COLD_USER] * 4 + [user_id(u) for u in range(0, 10, 2)],
            "movieId": [movie_id(i) for i in range(4)] + [COLD_MOVIE] * 5,
            "rating": [4.0, 3.0, 2.5, 5.0, 3.5, 4.0, 3.0, 2.0, 4.5],
            "timestamp": [2_000_000] * 9,
            "split": ["test"] * 9,
        }
    )
    frame = pl.concat([frame, cold])
    if flip_test:
        frame = frame.with_columns(
            rating=pl.when(pl.col("split") == "test").then(5.5 - pl.col("rating")).otherwise(pl.col("rating"))
        )
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "val", "test"):
        paths[split] = str(root / f"{split}.csv")
        frame.filter(pl.col("split") == split).drop("split").write_csv(paths[split])
    movies = pl.DataFrame(
        {
            "movieId": [movie_id(i) for i in range(N_ITEMS)] + [COLD_MOVIE],
            "title": [f"Planted {i} (2001)" for i in range(N_ITEMS)] + ["Only In Test (1999)"],
            "genres": ["Drama"] * (N_ITEMS + 1),
        }
    )
    paths["items"] = str(root / "movies.csv")
    movies.write_csv(paths["items"])
    return paths


def config(paths: dict[str, str], **overrides) -> Config:
    base = {
        "source.train_path": paths["train"],
        "source.val_path": paths["val"],
        "source.test_path": paths["test"],
        "source.items_path": paths["items"],
        "prepare.split": "given",
        **SMALL_RUN,
        "pipeline.train_share.fraction": 0.5,  # stages 2 and 3 train on a seeded half of the training rows
        # few epochs of many small steps (the checkpoint policy writes the final state only: epochs are short)
        "stages.mf": {"model": "biased_mf", "params": {"rank": 8}, "train": {"epochs": 10, "solver": "sgd"}},
        "stages.reliability.train": {"epochs": 6, "batch_size": 64, "lr": 0.003, "patience": 0},
        "stages.rating.train": {"epochs": 4, "batch_size": 256, "lr": 0.003, "patience": 0},
    }
    return load_config(None, {**base, **overrides})


def read(path: Path) -> pl.DataFrame:
    frame = pl.from_arrow(pq.read_table(path))
    assert isinstance(frame, pl.DataFrame)
    return frame


def table(outputs: Path, name: str) -> pl.DataFrame:
    """An analyst table from its folder (hive partitions as columns: predictions' split)."""
    import pyarrow.dataset as ds

    frame = pl.from_arrow(ds.dataset(outputs / name, format="parquet", partitioning="hive").to_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def file_schema(outputs: Path, name: str) -> pa.Schema:
    return pq.read_schema(next((outputs / name).rglob("*.parquet")))


def read_dir(dataset: Path) -> pl.DataFrame:
    return pl.concat([read(f) for f in sorted((dataset / "ratings").glob("*.parquet"))])


def tensors(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run / stage / "model" / "model.safetensors")


def manifest(run: Path, stage: str | None = None) -> dict:
    return json.loads(((run / stage) if stage else run).joinpath("manifest.json").read_text())


def recdist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recdist", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("planted")
    return {"same": write_planted(root / "same"), "flipped": write_planted(root / "flipped", flip_test=True)}


@pytest.fixture(scope="module")
def full_run(ray_cluster, planted, tmp_path_factory) -> tuple[Path, dict]:
    """A whole RNCF pipeline, prepare included."""
    out = tmp_path_factory.mktemp("runs") / "full"
    summary = run_pipeline(config(planted["same"]), str(out))
    return out, summary


@pytest.fixture(scope="module")
def stopped_run(ray_cluster, planted, tmp_path_factory) -> tuple[Path, dict, dict]:
    """The same pipeline on data whose test ratings differ, stopped after stage 2, then resumed.

    Returns the run, the file times and manifests seen at the stop, and the resumed run's summary.
    """
    out = tmp_path_factory.mktemp("runs") / "stopped"
    cfg = config(planted["flipped"])
    os.environ[STOP_AFTER_ENV] = "reliability"
    try:
        with pytest.raises(RuntimeError, match="stopped after stage reliability"):
            run_pipeline(cfg, str(out))
    finally:
        del os.environ[STOP_AFTER_ENV]
    at_stop = {
        "files": {
            f: (out / f).stat().st_mtime_ns
            for f in (
                "data/manifest.json",
                "mf/manifest.json",
                "mf/model/model.safetensors",
                "reliability/manifest.json",
                "reliability/model/model.safetensors",
            )
        },
        "run": manifest(out),
        "rating_exists": (out / "rating").exists(),
        "outputs_exists": (out / "outputs").exists(),
    }
    summary = run_pipeline(cfg, str(out))
    return out, at_stop, summary


def test_a_whole_run_writes_every_output_with_its_schema_and_row_counts(full_run):
    out, summary = full_run
    assert summary["status"] == "complete"
    assert list(summary["stages"]) == ["prepare", "mf", "reliability", "rating", "outputs"]
    n = manifest(out, "data")["n_ratings"]
    assert n == N_USERS * PER_USER + 9
    for stage in ("mf", "reliability", "rating"):
        assert manifest(out, stage)["stage_hash"] == summary["stages"][stage]["hash"]
        assert manifest(out, stage)["scoring"]["rows"] == n
    # the scored tables grow stage by stage, in the documented types
    scored = pq.read_schema(next((out / "rating" / "scored" / "ratings").glob("*.parquet")))
    for field in schema.SCORED_EXTRA:
        assert scored.field(field.name).type == field.type

    o = out / "outputs"
    predictions = table(o, "predictions")
    assert file_schema(o, "predictions") == schema.OUTPUT_TABLES["predictions"].file_schema()  # split: the folder
    assert sorted(p.name for p in (o / "predictions").iterdir()) == ["split=test", "split=train", "split=val"]
    assert predictions.height == n and predictions["expected_abs_error"].null_count() == 0
    assert predictions.filter(pl.col("user_id") == user_id(0)).height > 0  # original ids, not indices
    assert predictions["title"].null_count() == 0 and predictions["rated_at"].null_count() == 0
    assert predictions["rated_at"].min().year == 1970  # the planted timestamps: seconds from 1,000,000
    assert predictions["pred_rating"].min() >= 0.5 and predictions["pred_rating"].max() <= 5.0
    for f in (o / "predictions").rglob("*.parquet"):  # sorted by user within each file
        users = pq.read_table(f, columns=["user_id"])["user_id"].to_numpy()
        assert (np.diff(users) >= 0).all(), f

    recs = table(o, "recommendations")
    assert file_schema(o, "recommendations") == schema.RECOMMENDATIONS
    assert recs.group_by("user_id").len()["len"].max() == 5
    assert recs["user_id"].n_unique() == N_USERS + 1  # the cold user gets popular-by-MF movies too
    seen = predictions.select("user_id", "movie_id")
    assert recs.join(seen, on=["user_id", "movie_id"], how="semi").height == 0  # unseen movies only
    assert (recs.group_by("user_id").agg(pl.col("rank_score").diff().max())["rank_score"].fill_null(0) <= 1e-6).all()
    # the order is explained by (rank_score, candidate_score) descending: ties of rank_score fall to the candidates
    ranked = recs.sort("user_id", "rank")
    by = ranked.sort(["user_id", "rank_score", "candidate_score"], descending=[False, True, True], maintain_order=True)
    assert by["movie_id"].equals(ranked["movie_id"])

    factors = table(o, "item_factors")
    assert file_schema(o, "item_factors") == schema.ITEM_FACTORS
    assert factors.height == N_ITEMS and COLD_MOVIE not in factors["movie_id"].to_list()
    assert factors["factors"].list.len().unique().to_list() == [8]
    users = table(o, "user_factors")
    assert file_schema(o, "user_factors") == schema.USER_FACTORS
    assert users.height == N_USERS and COLD_USER not in users["user_id"].to_list()
    assert users["factors"].list.len().unique().to_list() == [8]
    similar = table(o, "similar_items")
    assert file_schema(o, "similar_items") == schema.SIMILAR_ITEMS
    assert similar.group_by("movie_id").len()["len"].unique().to_list() == [4]
    assert similar.filter(pl.col("movie_id") == pl.col("similar_movie_id")).height == 0
    deciles = table(o, "reliability_deciles")
    assert file_schema(o, "reliability_deciles") == schema.RELIABILITY_DECILES
    assert deciles["decile"].to_list() == list(range(1, 11))
    assert deciles["n"].sum() == predictions.filter(pl.col("split") == "test").height

    metrics = json.loads((o / "metrics.json").read_text())
    for stage in ("mf", "reliability", "rating"):
        assert set(metrics[stage]) == {"train", "val", "test"}
        assert {"rmse", "mae"} <= set(metrics[stage]["test"])
    assert metrics["rating"]["test"]["rmse"] < 1.0  # learnt: the noise alone is sqrt((0.15^2 + 1.1^2) / 2) ~ 0.79
    for ranking in ("popularity", "mf", "rating"):
        assert {"precision@10", "recall@10", "ndcg@10", "users"} <= set(metrics["ranking"][ranking])
    assert set(metrics["ranking"]["vs_popularity"]) == {"mf", "rating"}  # NDCG over the popularity baseline's
    assert metrics["ranking"]["rank_candidates"] == "ease" and "popularity (most-rated movies)" in (
        o / "report.md"
    ).read_text()


def test_every_output_table_opens_from_its_folder_in_four_readers_with_metrics_row_counts(full_run):
    """pyarrow.dataset, DuckDB, Polars and pandas each open every table from its folder (predictions with its
    split partitions as a column) with the row counts metrics.json gives; nothing else in a table's folder."""
    import pyarrow.dataset as ds

    o = full_run[0] / "outputs"
    metrics = json.loads((o / "metrics.json").read_text())
    assert set(metrics["rows"]) == set(schema.OUTPUT_TABLES)  # an RNCF run writes every table
    for name, n in metrics["rows"].items():
        folder = o / name
        assert {f.suffix for f in folder.rglob("*") if f.is_file()} == {".parquet"}, name
        assert set(reader_counts(folder).values()) == {n}, (name, reader_counts(folder))
    # a filter on the partition column reads only that split's files, and every reader sees the column
    test_rows = metrics["cold"]["test"]["rows"]
    assert set(reader_counts(o / "predictions", where="test").values()) == {test_rows}
    dataset = ds.dataset(o / "predictions", format="parquet", partitioning="hive")
    fragments = list(dataset.get_fragments(filter=ds.field("split") == "test"))
    assert fragments and all("/split=test/" in f.path for f in fragments)

def test_every_output_file_is_stamped_with_the_run_and_describes_its_columns(full_run):
    out, summary = full_run
    run = manifest(out)
    files = sorted((out / "outputs").rglob("*.parquet"))
    assert len(files) >= 3 + len(schema.OUTPUT_TABLES)  # predictions: one file per shard and split
    for f in files:
        meta = pq.read_metadata(f).metadata
        assert meta[b"recdist.run_id"].decode() == run["run_id"] == summary["run_id"]
        assert meta[b"recdist.config_hash"].decode() == run["config_hash"]
        assert meta[b"recdist.version"].decode() == recdist_version()
        assert (b"recdist.git_commit" in meta) == (tables.git_commit() is not None)
        assert meta[b"recdist.table"].decode() == f.relative_to(out / "outputs").parts[0]
        for field in pq.read_schema(f):
            assert field.metadata and field.metadata[b"description"], (f, field.name)
    assert (out / "outputs" / "SCHEMA.md").read_text() == tables.data_dictionary()
    listed = {e["path"] for e in manifest(out, "outputs")["files"]}
    assert {str(f.relative_to(out / "outputs")) for f in files} <= listed and "SCHEMA.md" in listed
    # _SUCCESS is written last, and no table folder holds anything but Parquet
    success = (out / "outputs" / tables.SUCCESS).stat().st_mtime_ns
    assert all(f.stat().st_mtime_ns <= success for f in (out / "outputs").rglob("*") if f.is_file())
    assert {p.name for p in (out / "outputs").iterdir() if p.is_file()} == {
        "metrics.json", "report.md", "SCHEMA.md", "manifest.json", tables.SUCCESS, CANDIDATE_MODEL
    }  # the EASE candidate model the recommendations were ranked with (a fold-in night ranks with it again)
    assert CANDIDATE_MODEL in listed
    assert sorted(p.name for p in (out / "outputs" / "figures").iterdir()) == [
        "learning_curves.png", "movie_map.png", "reliability_deciles.png"
    ]


def recdist_version() -> str:
    from recdist import __version__

    return __version__


def test_stages_2_and_3_train_on_the_seeded_share_and_score_every_row(full_run):
    out, _ = full_run
    sample = manifest(out / "mf" / "scored", "sample")
    splits = manifest(out, "data")["splits"]
    assert sample["splits"]["val"] == splits["val"] and sample["splits"]["test"] == 0
    assert 0.4 * splits["train"] < sample["splits"]["train"] < 0.6 * splits["train"]
    for stage, upstream in (("reliability", "mf"), ("rating", "reliability")):
        trained_on = json.loads((out / stage / "model" / "manifest.json").read_text())["data"]
        assert Path(trained_on) == out / upstream / "scored" / "sample"
    # the same rows in both samples (one hash), and every row scored by every stage
    a, b = (read_dir(out / s / "scored" / "sample") for s in ("mf", "reliability"))
    assert a.select("user_idx", "item_idx").equals(b.select("user_idx", "item_idx"))
    assert manifest(out, "rating")["scoring"]["rows"] == manifest(out, "data")["n_ratings"]


def test_stage_1_writes_every_ratings_session_context_and_later_stages_keep_it(full_run):
    from recdist.infer.session import DEFAULT_SESSION, SESSION_COLUMNS, session_columns

    out, _ = full_run
    scored = read_dir(out / "mf" / "scored")
    assert set(SESSION_COLUMNS) <= set(manifest(out / "mf", "scored")["scored_columns"])
    expect = session_columns(scored, DEFAULT_SESSION)
    assert scored.select(SESSION_COLUMNS).equals(expect)  # computed over every shard together
    assert scored["sess_short_n"].mean() > 5  # the planted users rate a movie a second
    sample = read_dir(out / "mf" / "scored" / "sample")
    same = ["user_idx", "item_idx", *SESSION_COLUMNS]
    assert sample.height > 0 and sample.join(scored.select(same), on=same, how="anti").height == 0
    assert read_dir(out / "rating" / "scored").select(SESSION_COLUMNS).equals(scored.select(SESSION_COLUMNS))


def test_ray_data_scoring_writes_what_the_plain_scorer_writes(full_run, tmp_path):
    from recdist.infer.ray_data import score
    from recdist.infer.scored import ScoreOptions, score_local
    from recdist.infer.session import SessionStep

    out, _ = full_run
    data, model = str(out / "data"), str(out / "mf" / "model")
    options = ScoreOptions(role="mf", features=(SessionStep(),))
    ray_result = score(model, data, str(tmp_path / "ray"), options)
    local_result = score_local(model, data, str(tmp_path / "local"), replace(options, workers=2))
    assert ray_result["engine"] == "ray-data" and local_result["engine"] == "local"
    names = sorted(p.name for p in (tmp_path / "ray" / "ratings").iterdir())
    assert names == sorted(p.name for p in (out / "data" / "ratings").iterdir())  # shard n -> shard n
    for name in names:
        assert pq.read_table(tmp_path / "ray" / "ratings" / name).equals(
            pq.read_table(tmp_path / "local" / "ratings" / name)
        )


def test_a_pass_scores_in_the_worker_processes_warmed_before_it(full_run, tmp_path):
    import ray

    from recdist.infer.ray_data import score, warm_workers
    from recdist.infer.scored import ScoreOptions

    out, _ = full_run
    processes = ray.get(warm_workers(actors=2))  # what a pipeline on Ray starts before stage 1 trains
    assert len(set(processes)) == 2
    result = score(str(out / "mf" / "model"), str(out / "data"), str(tmp_path / "ray"), ScoreOptions(actors=2))
    assert result["actors"] == 2 and result["warmed_tasks"] == 2  # both tasks ran in warmed processes


def test_the_predictions_pass_gives_the_same_table_and_figures_on_one_thread_as_on_several(full_run, tmp_path,
                                                                                           monkeypatch):
    from recdist.data.dataset import read_items, read_users
    from recdist.infer import outputs
    from recdist.manifest import OutputsManifest

    out, _ = full_run
    models = OutputsManifest.model_validate_json((out / "outputs" / "manifest.json").read_text()).models
    models = models.resolved(str(out))
    users = read_users(models.data).select("user_idx", "user_id", "n_train")
    items = read_items(models.data).select("item_idx", "item_id", "title", "genres", "n_train")
    stamp = tables.Stamp("0", "run", "hash")
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(outputs.storage, "shard_threads", lambda shards, n=threads: n)
        results[threads] = outputs._prediction_tables(models, str(tmp_path / str(threads)), stamp, users, items)
    (one, test_1, seen_1, cold_1), (three, test_3, seen_3, cold_3) = results[1], results[3]
    assert one == three and cold_1 == cold_3 and test_1.equals(test_3) and seen_1.equals(seen_3)
    written = {n: sorted(p.relative_to(tmp_path / n) for p in (tmp_path / n).rglob("*.parquet")) for n in "13"}
    assert len(written["1"]) >= 3 and written["1"] == written["3"]
    for rel in written["1"]:
        assert pq.read_table(tmp_path / "1" / rel).equals(pq.read_table(tmp_path / "3" / rel))


def test_reliability_finds_the_planted_noisy_users(full_run):
    out, _ = full_run
    predictions = table(out / "outputs", "predictions")
    deciles = table(out / "outputs", "reliability_deciles")
    assert deciles["rmse"][0] < 0.7 * deciles["rmse"][9]  # most reliable decile clearly beats the least
    assert deciles["mae"][0] < 0.7 * deciles["mae"][9]
    known = predictions.filter(~pl.col("cold"))
    noisy = ((pl.col("user_id") - 10) // 3) % 2 == 1
    by_group = known.group_by(noisy.alias("noisy")).agg(pl.col("expected_abs_error").mean()).sort("noisy")
    assert by_group["expected_abs_error"][1] > 1.4 * by_group["expected_abs_error"][0]  # in stars, lower = reliable


def test_cold_rows_get_the_mean_plus_known_bias_and_the_flag(full_run):
    out, _ = full_run
    predictions = table(out / "outputs", "predictions")
    cold = predictions.filter(pl.col("cold"))
    assert set(cold["user_id"].to_list()) >= {COLD_USER} and cold.height == 9
    assert set(cold.filter(pl.col("user_id") != COLD_USER)["movie_id"].to_list()) == {COLD_MOVIE}
    assert (cold["split"].cast(pl.String) == "test").all()
    mf = tensors(out, "mf")
    mean = float(manifest(out, "data")["global_mean"])
    users = read(out / "data" / "users.parquet")
    items = read(out / "data" / "items.parquet")
    idx_of_item = dict(zip(items["item_id"].to_list(), items["item_idx"].to_list(), strict=True))
    idx_of_user = dict(zip(users["user_id"].to_list(), users["user_idx"].to_list(), strict=True))
    for row in cold.iter_rows(named=True):
        if row["user_id"] == COLD_USER:  # unknown user, known movie: mean + b_i
            expect = mean + float(mf["item_bias.weight"][idx_of_item[row["movie_id"]], 0])
        else:  # known user, unknown movie: mean + b_u
            expect = mean + float(mf["user_bias.weight"][idx_of_user[row["user_id"]], 0])
        assert row["mf_pred"] == pytest.approx(expect, abs=1e-5)
        assert row["pred_rating"] == pytest.approx(expect, abs=1e-5)  # stages 2-3 fall back to the same
    spread = manifest(out, "reliability")  # cold rows are the least reliable of all
    assert spread["stage"] == "reliability"
    error = "expected_abs_error"
    assert cold[error].min() >= predictions.filter(~pl.col("cold"))[error].median()


def test_the_test_split_feeds_no_training_and_a_stopped_run_resumes_at_stage_3(full_run, stopped_run):
    full, _ = full_run
    out, at_stop, summary = stopped_run
    # killed after stage 2: stages 1-2 committed, stage 3 not started, the run marked running
    assert not at_stop["rating_exists"] and not at_stop["outputs_exists"]  # no outputs/_SUCCESS either
    assert at_stop["run"]["status"] == "running" and "rating" not in at_stop["run"]["stages"]
    # resumed: 1 and 2 were not redone (same files, same commit times), 3 and the outputs ran
    for f, mtime in at_stop["files"].items():
        assert (out / f).stat().st_mtime_ns == mtime, f
    for stage in ("prepare", "mf", "reliability"):
        assert summary["stages"][stage] == at_stop["run"]["stages"][stage]
    assert summary["status"] == "complete" and manifest(out, "rating")["stage"] == "rating"
    assert (out / "outputs" / tables.SUCCESS).exists() and summary["run_id"] == at_stop["run"]["run_id"]
    # every test rating was mirrored (r -> 5.5 - r), yet every trained model is bit for bit the same
    test_full = table(full / "outputs", "reliability_deciles")
    test_flip = table(out / "outputs", "reliability_deciles")
    assert not test_full["rmse"].equals(test_flip["rmse"])  # the test ratings did change
    for stage in ("mf", "reliability", "rating"):
        a, b = tensors(full, stage), tensors(out, stage)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{stage}: {name} depends on the test ratings"


def test_the_driver_log_is_kept_in_the_run_one_file_per_invocation(stopped_run):
    """RUN/logs/ holds what the driver logged (it outlives a RayJob's cluster): stages, epochs, the error."""
    out, _, summary = stopped_run
    first, second = sorted((out / "logs").iterdir())
    stopped, resumed = first.read_text(), second.read_text()
    for stage in ("prepare", "mf", "reliability"):
        assert f"INFO recdist.pipeline: {stage}: committed in" in stopped
    assert "ERROR recdist: stopped: stopped after stage reliability" in stopped and "rating: running" not in stopped
    assert "recdist.pipeline: mf: committed with the same config, skipped" in resumed
    assert "recdist.pipeline: rating: committed in" in resumed and "recdist.pipeline: outputs: committed in" in resumed
    assert re.search(r"INFO recdist\.train\.run: \w+ in this process: epoch 1/\d+ train loss", resumed)
    assert summary["log"] == str(second)


def test_changed_config_refuses_stale_stages_and_from_redoes_only_what_follows(full_run, planted):
    out, summary = full_run
    before = {s: manifest(out, s)["created_at"] for s in ("mf", "reliability", "rating")}
    outputs_time = (out / "outputs" / "manifest.json").stat().st_mtime_ns
    # a changed stage-3 model: stage 3 and the outputs are stale; nothing is run or removed
    changed = config(planted["same"], **{"stages.rating.params": {"hidden": [16]}})
    with pytest.raises(StorageError, match="rating, outputs made with another config"):
        run_pipeline(changed, str(out))
    # a changed stage-1 model makes every later stage stale
    with pytest.raises(StorageError, match="mf, reliability, rating, outputs"):
        run_pipeline(config(planted["same"], **{"stages.mf.params": {"rank": 4}}), str(out))
    assert (out / "outputs" / "manifest.json").stat().st_mtime_ns == outputs_time
    # the same config again: everything is skipped
    again = run_pipeline(config(planted["same"]), str(out))
    assert again["stages"] == summary["stages"]
    # changed output settings with --from outputs: only the outputs are redone, with the new settings
    n_train = read(out / "data" / "items.parquet").select(movie_id="item_id", n="n_train")
    floor = int(n_train["n"].median())  # half the movies are too rarely rated to be recommended
    assert table(out / "outputs", "recommendations").join(n_train, on="movie_id")["n"].min() < floor
    more = config(planted["same"], **{"pipeline.outputs.top_n": 7, "pipeline.outputs.recommend_min_ratings": floor})
    redone = run_pipeline(more, str(out), from_stage="outputs")
    assert {s: manifest(out, s)["created_at"] for s in before} == before
    assert redone["stages"]["outputs"]["hash"] != summary["stages"]["outputs"]["hash"]
    recs = table(out / "outputs", "recommendations")
    assert recs.group_by("user_id").len()["len"].max() == 7
    assert recs.join(n_train, on="movie_id")["n"].min() >= floor
    asked = recdist("recommend", str(out), "--user", str(user_id(1)), "-n", "12")  # beyond top_n: recomputed
    assert asked.returncode == 0, asked.stderr
    stored = recs.filter(pl.col("user_id") == user_id(1))
    assert all(f" {m} " in asked.stdout for m in stored["movie_id"].to_list())  # the same ranking, recomputed
    rare = n_train.filter(pl.col("n") < floor)["movie_id"].to_list()
    assert not any(f" {m} " in asked.stdout for m in rare)
    with pytest.raises(ConfigError, match="unknown stage"):
        run_pipeline(more, str(out), from_stage="stage3")
    run_pipeline(config(planted["same"]), str(out), from_stage="outputs")  # as it was


def test_a_directory_that_is_not_a_run_is_never_overwritten(planted, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match="not a recdist run directory"):
        run_pipeline(config(planted["same"]), str(out))
    assert (out / "notes.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["notes.txt"]


def test_the_report_names_its_figures_and_they_exist(full_run):
    out, _ = full_run
    report = (out / "outputs" / "report.md").read_text()
    for png in ("reliability_deciles.png", "movie_map.png", "learning_curves.png"):
        assert f"](figures/{png})" in report
        assert (out / "outputs" / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Stage 3 changes test RMSE" in report and "| 10 |" in report  # accuracy and the decile table
    assert "predicted abs error (mean) | observed abs error (MAE)" in report  # the calibration table
    assert f"| run id | `{manifest(out)['run_id']}` |" in report


def test_recommend_and_similar_from_the_command_line(full_run, tmp_path):
    out, _ = full_run
    stored = table(out / "outputs", "recommendations").filter(pl.col("user_id") == user_id(1))
    result = recdist("recommend", str(out), "--user", str(user_id(1)), "-n", "3")
    assert result.returncode == 0, result.stderr
    for movie in stored.sort("rank")["movie_id"].head(3).to_list():
        assert str(movie) in result.stdout
    more = recdist("recommend", str(out), "--user", str(user_id(1)), "-n", "7")  # more than stored: ranked again,
    assert more.returncode == 0, more.stderr  # with the run's saved candidate model, so it begins as the stored list
    cells = [[c.strip() for c in line.split("│")] for line in more.stdout.splitlines()]
    shown = [int(row[2]) for row in cells if len(row) > 2 and row[1].isdigit()]  # rank │ movie_id │ ...
    assert shown[:5] == stored.sort("rank")["movie_id"].to_list() and len(shown) == 7

    liked = [movie_id(i) for i in range(6)]
    ratings = tmp_path / "me.csv"
    ratings.write_text("movieId,rating\n" + "".join(f"{m},{5.0 if k < 3 else 1.0}\n" for k, m in enumerate(liked)))
    result = recdist("recommend", str(out), "--ratings", str(ratings), "-n", "4")
    assert result.returncode == 0, result.stderr
    assert "Planted" in result.stdout
    assert not any(f" {m} " in result.stdout for m in liked)  # rated movies are not recommended back

    similar = table(out / "outputs", "similar_items").filter(pl.col("movie_id") == movie_id(5))
    result = recdist("similar", str(out), "--movie", str(movie_id(5)), "-k", "3")
    assert result.returncode == 0, result.stderr
    assert str(similar.sort("rank")["similar_movie_id"][0]) in result.stdout

    bad = recdist("similar", str(out), "--movie", "123456789")
    assert bad.returncode == 2 and "123456789" in bad.stderr


def test_a_single_model_pipeline_gives_the_same_outputs(full_run, tmp_path):
    full, _ = full_run
    out = tmp_path / "single"
    cfg = load_config(  # on the full run's prepared data (--data)
        None,
        {
            "pipeline.kind": "single",
            "pipeline.top_n": 5,  # the flat keys of before pipeline's sub-sections still load (MOVED_KEYS)
            "pipeline.similar_k": 4,
            "pipeline.similar_min_ratings": 5,
            "pipeline.infer_actors": 1,
            "stages.single": {
                "model": "mf_residual_mlp",
                "params": {"rank": 8},
                "train": {"epochs": 5, "batch_size": 256},
            },
        },
    )
    summary = run_pipeline(cfg, str(out), data=str(full / "data"))
    assert list(summary["stages"]) == ["single", "outputs"]
    o = out / "outputs"
    predictions = table(o, "predictions")
    assert file_schema(o, "predictions") == schema.OUTPUT_TABLES["predictions"].file_schema()
    assert predictions.height == manifest(full, "data")["n_ratings"]
    assert predictions["expected_abs_error"].null_count() == predictions.height  # no reliability stage
    for name, expected in (
        ("recommendations", schema.RECOMMENDATIONS),
        ("item_factors", schema.ITEM_FACTORS),
        ("user_factors", schema.USER_FACTORS),
        ("similar_items", schema.SIMILAR_ITEMS),
    ):
        assert file_schema(o, name) == expected
    metrics = json.loads((o / "metrics.json").read_text())
    assert metrics["single"]["test"]["rmse"] < 1.0 and "mf" not in metrics
    assert not (o / "reliability_deciles").exists() and "reliability_deciles" not in metrics["rows"]
    assert (o / tables.SUCCESS).exists()
    assert "mf_residual_mlp" in (o / "report.md").read_text()
    assert storage.is_committed(str(o))
    stage_2_alone = load_config(None, {"pipeline.kind": "single", "stages.single.model": "reliability_mlp"})
    with pytest.raises(ConfigError, match="cannot run alone"):
        run_pipeline(stage_2_alone, str(tmp_path / "x"), data=str(full / "data"))


# --- trust what a run left (issue 18): damaged shards, --from beside the committed stage, stale stages --------


def copied_run(full_run, tmp_path: Path) -> Path:
    """A copy of the finished run to damage (the module's run stays whole for the other tests)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_run[0], copy)
    return copy


def test_a_damaged_shard_is_found_by_the_skip_decision_by_from_and_by_recommend(full_run, planted, tmp_path):
    out = copied_run(full_run, tmp_path)
    shard = out / "rating" / "scored" / "ratings" / "part-00001.parquet"
    shard.unlink()  # issue 18: exit 0 with half the predictions
    for from_stage in (None, "outputs"):
        with pytest.raises(IntegrityError, match="missing") as caught:
            run_pipeline(config(planted["same"]), str(out), from_stage=from_stage)
        assert str(shard) in str(caught.value) and "--from rating" in str(caught.value)
    data_shard = out / "data" / "ratings" / "part-00000.parquet"
    raw = bytearray(data_shard.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = bytes(16)  # 16 bytes zeroed mid-shard: same size
    data_shard.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256 differs") as caught:
        run_pipeline(config(planted["same"]), str(out), from_stage="mf")
    assert "--from prepare" in str(caught.value)
    (recs,) = (out / "outputs" / "recommendations").glob("*.parquet")
    recs.write_bytes(recs.read_bytes()[:-10])
    asked = recdist("recommend", str(out), "--user", str(user_id(1)))
    assert asked.returncode == 2 and "truncated" in asked.stderr and "--from outputs" in asked.stderr
    assert not list(out.glob("*.next")) and not list(out.rglob("*.staging-*"))


def test_a_failed_from_leaves_the_committed_stages_and_outputs_readable(full_run, planted, tmp_path, monkeypatch):
    from recdist import report as report_module
    from recdist.train import run as train_run

    out = copied_run(full_run, tmp_path)
    before = {s: manifest(out, s) for s in ("mf", "outputs")}

    def broken(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(report_module, "write_report", broken)  # dies while writing the new outputs
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(config(planted["same"], **{"pipeline.outputs.top_n": 3}), str(out), from_stage="outputs")
    monkeypatch.setattr(train_run, "train_stage", broken)  # dies while retraining stage 1
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(config(planted["same"]), str(out), from_stage="mf")
    assert {s: manifest(out, s) for s in before} == before  # issue 18: no outputs at all, or a deleted model
    assert (out / "mf.next" / "intent.json").exists()  # the rebuild resumes from here next time
    asked = recdist("recommend", str(out), "--user", str(user_id(1)), "-n", "3")
    assert asked.returncode == 0, asked.stderr
    assert not list(out.rglob("*.staging-*")) and not (out / ".lock").exists()


def test_from_swaps_the_stage_in_whole_and_later_stages_are_stale_until_redone(full_run, planted, tmp_path):
    out = copied_run(full_run, tmp_path)
    (out / "outputs.staging-0badc0de").mkdir()  # left by a killed run
    cfg = config(planted["same"])
    os.environ[STOP_AFTER_ENV] = "rating"
    try:
        with pytest.raises(RuntimeError, match="stopped after stage rating"):
            run_pipeline(cfg, str(out), from_stage="rating")
    finally:
        del os.environ[STOP_AFTER_ENV]
    assert not (out / "outputs.staging-0badc0de").exists() and not (out / "rating.next").exists()
    asked = recdist("recommend", str(out), "--user", str(user_id(1)))
    assert asked.returncode == 2 and "stale" in asked.stderr and "finish the run" in asked.stderr
    resumed = run_pipeline(cfg, str(out))
    log = sorted((out / "logs").iterdir())[-1].read_text()
    assert "rating: committed with the same config, skipped" in log and "outputs: stale" in log
    assert "outputs" in resumed["stages"] and recdist("recommend", str(out), "--user", str(user_id(1))).returncode == 0
