"""train_stage on a real local Ray cluster: 1 vs 2 workers, resume after failures, errors before and in work.

Each Ray Train run costs tens of seconds on two shared cores, so the runs are few and each asserts much.
"""

from __future__ import annotations

import json
import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest
from helpers import planted_frame, write_dataset

from recdist import storage
from recdist.config import ClusterConfig, StageConfig, TrainConfig
from recdist.errors import ConfigError, DataError, StorageError
from recdist.models.io import load_model, save_model
from recdist.schema import SESSION_COLUMNS
from recdist.train.run import FAIL_AT_EPOCH_ENV, build_model, train_stage

EPOCHS = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("planted") / "data", planted_frame(n_rows=2400), shards=4)


def mf_stage(**train) -> StageConfig:
    settings = {"solver": "autograd", "lr": 0.05, "batch_size": 256, "epochs": EPOCHS, "patience": 0}
    return StageConfig(model="biased_mf", params={"rank": 8}, train=TrainConfig(**{**settings, **train}))


def history_of(out) -> pl.DataFrame:
    return pl.from_arrow(pq.read_table(f"{out}/history.parquet"))


@pytest.mark.ray
@pytest.mark.slow
def test_one_and_two_workers_agree_and_commit_the_output(ray_cluster, dataset, tmp_path) -> None:
    one, two = tmp_path / "one" / "mf", tmp_path / "two" / "mf"
    m1 = train_stage(dataset, mf_stage(), ClusterConfig(workers=1), str(one))
    m2 = train_stage(dataset, mf_stage(), ClusterConfig(workers=2), str(two))

    assert m1["workers"] == 1 and m2["workers"] == 2 and m1["device"] == "cpu"
    assert m1["val"]["rmse"] < 0.6 and m2["val"]["rmse"] < 0.6  # learnt (the mean predictor: ~0.78)
    assert m2["val"]["rmse"] == pytest.approx(m1["val"]["rmse"], abs=0.03)
    for out, metrics in ((one, m1), (two, m2)):
        names = set(storage.listdir(str(out)))
        assert {"model.safetensors", "model.json", "history.parquet", "learning_curve.png", "metrics.json"} < names
        assert json.loads((out / "metrics.json").read_text()) == metrics
        assert history_of(out)["epoch"].to_list() == list(range(EPOCHS))
        assert json.loads((out / "manifest.json").read_text())["kind"] == "model"
        assert not (out.parent / "_ray").exists() or not list((out.parent / "_ray").iterdir())  # cleaned up
    model = load_model(str(one))
    assert model.registry_name == "biased_mf"
    with pytest.raises(StorageError, match="already exists"):  # a committed output is never retrained silently
        train_stage(dataset, mf_stage(), ClusterConfig(workers=1), str(one))


@pytest.mark.ray
@pytest.mark.slow
def test_failed_runs_resume_from_their_checkpoint(ray_cluster, dataset, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")
    # a worker dies after epoch 2 in the first attempt; Ray Train restarts the group from epoch 1's checkpoint
    out = tmp_path / "restart" / "mf"
    metrics = train_stage(dataset, mf_stage(), ClusterConfig(workers=1, max_failures=1), str(out))
    hist = history_of(out)
    assert hist["epoch"].to_list() == list(range(EPOCHS))
    assert hist["attempt"].to_list() == [0, 0] + [1] * (EPOCHS - 2)  # resumed at epoch 2, not restarted at 0
    assert metrics["attempts"] == 2

    # no restarts allowed: the run fails, nothing is committed, its checkpoints stay; the next call resumes
    out = tmp_path / "driver" / "mf"
    with pytest.raises(Exception, match="injected failure"):
        train_stage(dataset, mf_stage(), ClusterConfig(workers=1, max_failures=0), str(out))
    assert not storage.is_committed(str(out))
    monkeypatch.delenv(FAIL_AT_EPOCH_ENV)
    again = train_stage(dataset, mf_stage(), ClusterConfig(workers=1, max_failures=0), str(out))
    assert history_of(out)["attempt"].to_list() == [0, 0] + [1] * (EPOCHS - 2)
    assert again["val"]["rmse"] == pytest.approx(metrics["val"]["rmse"], abs=1e-6)  # same numbers either way


@pytest.mark.ray
def test_bad_configs_fail_before_any_work(ray_cluster, dataset, tmp_path) -> None:
    out = tmp_path / "run" / "stage"
    with pytest.raises(ConfigError, match="unknown model"):
        StageConfig(model="biased_mff")
    unknown = StageConfig.model_construct(model="biased_mff", params={}, train=TrainConfig())
    with pytest.raises(ConfigError, match="did you mean 'biased_mf'"):
        train_stage(dataset, unknown, ClusterConfig(), str(out))
    no_workers = ClusterConfig.model_construct(workers=0, gpu=False, cpus_per_worker=None, address=None)
    with pytest.raises(ConfigError, match="workers"):
        train_stage(dataset, mf_stage(), no_workers, str(out))
    with pytest.raises(ConfigError, match="no GPUs"):
        train_stage(dataset, mf_stage(), ClusterConfig(gpu=True), str(out))
    with pytest.raises(ConfigError, match="4 workers x 4 CPUs"):
        train_stage(dataset, mf_stage(), ClusterConfig(workers=4, cpus_per_worker=4), str(out))
    # stage 2 on a prepared dataset (no `error` column), and without its stage-1 model
    with pytest.raises(DataError, match="error"):
        train_stage(dataset, StageConfig(model="reliability_mlp"), ClusterConfig(), str(out))
    assert not out.parent.exists()  # nothing was started or written


@pytest.mark.ray
@pytest.mark.slow
def test_a_workers_data_error_surfaces_as_itself(ray_cluster, tmp_path) -> None:
    frame = planted_frame(n_rows=600)
    # negative "squared errors": the reliability model refuses them inside the worker (set_context)
    extra = {"error": [-1.0] * frame.height, "mf_pred": [3.0] * frame.height}
    extra |= {name: [0.0] * frame.height for name in SESSION_COLUMNS}  # the session context stage 2 reads
    scored = write_dataset(tmp_path / "scored", frame, shards=2, extra=extra)
    mf = build_model(StageConfig(model="biased_mf", params={"rank": 4}), _dims(scored))
    save_model(mf, str(tmp_path / "mf"))
    stage = StageConfig(model="reliability_mlp", train=TrainConfig(epochs=2))
    with pytest.raises(DataError, match="not squared errors"):
        train_stage(
            scored,
            stage,
            ClusterConfig(max_failures=0),
            str(tmp_path / "reliability"),
            upstream=str(tmp_path / "mf"),
        )
    assert not storage.is_committed(str(tmp_path / "reliability"))


@pytest.mark.ray
@pytest.mark.slow
def test_paths_relative_to_the_callers_directory_reach_the_workers(ray_cluster, dataset, tmp_path, monkeypatch):
    """The README's commands take relative paths; Ray's workers and actors run in another directory."""
    from recdist.infer.ray_data import score
    from recdist.infer.scored import ScoreOptions

    shutil.copytree(dataset, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train_stage("data", mf_stage(epochs=1), ClusterConfig(workers=1), "runs/mf")
    assert storage.is_committed(str(tmp_path / "runs" / "mf"))
    result = score("runs/mf", "data", "runs/scored", ScoreOptions(role="mf", actors=1))
    assert storage.is_committed(str(tmp_path / "runs" / "scored"))
    assert result["rows"] == json.loads((tmp_path / "data" / "manifest.json").read_text())["n_ratings"]


def _dims(uri: str):
    from recdist.data import dataset

    return dataset.dims(dataset.read_manifest(uri))
