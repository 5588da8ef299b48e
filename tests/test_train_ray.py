"""train_stage on a real local Ray cluster: 1 vs 2 workers, resume after failures, errors before and in work.

Each Ray Train run costs tens of seconds on two shared cores, so the runs are few and each asserts much.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

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
    one, two, here = tmp_path / "one" / "mf", tmp_path / "two" / "mf", tmp_path / "here" / "mf"
    m1 = train_stage(dataset, mf_stage(), ClusterConfig(workers=1, in_process=False), str(one))
    m2 = train_stage(dataset, mf_stage(), ClusterConfig(workers=2), str(two))
    local = train_stage(dataset, mf_stage(), ClusterConfig(workers=1), str(here))  # a one-node cluster: in process

    assert m1["workers"] == 1 and m2["workers"] == 2 and m1["device"] == "cpu"
    assert m1["val"]["rmse"] < 0.6 and m2["val"]["rmse"] < 0.6  # learnt (the mean predictor: ~0.78)
    assert m2["val"]["rmse"] == pytest.approx(m1["val"]["rmse"], abs=0.03)
    for split in ("train", "val", "test"):  # the same loop, seeds and threads: the same numbers
        assert local[split] == pytest.approx(m1[split], abs=1e-6)
    assert local["overhead"]["start_s"] < m1["overhead"]["start_s"]  # no worker process to start
    for out, metrics in ((one, m1), (two, m2), (here, local)):
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


#: Checkpoints after epochs 2 and 4 (1-based) whatever the epochs take; the final state is checkpointed anyway.
EVERY_2 = {"checkpoint_every_epochs": 2, "checkpoint_every_seconds": 0}


@pytest.mark.ray
@pytest.mark.slow
def test_failed_runs_resume_from_their_checkpoint(ray_cluster, dataset, tmp_path, monkeypatch) -> None:
    """A killed worker and a killed driver land on the uninterrupted run's metrics under the checkpoint policy."""
    whole = train_stage(dataset, mf_stage(), ClusterConfig(workers=1, **EVERY_2), str(tmp_path / "whole" / "mf"))

    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "3")
    # a worker dies after epoch 3 (0-based) in the first attempt: epoch 2 was trained but not checkpointed, so
    # Ray Train restarts the group from the checkpoint after epoch 1 and trains epochs 2-4 again
    out = tmp_path / "restart" / "mf"
    ray_train = ClusterConfig(workers=1, in_process=False, max_failures=1, **EVERY_2)
    metrics = train_stage(dataset, mf_stage(), ray_train, str(out))
    hist = history_of(out)
    assert hist["epoch"].to_list() == list(range(EPOCHS))
    assert hist["attempt"].to_list() == [0, 0] + [1] * (EPOCHS - 2)  # resumed at epoch 2, not restarted at 0
    assert metrics["attempts"] == 2
    assert whole["overhead"]["checkpoints"] == 3  # after epochs 2 and 4 (1-based), then the final state

    # in this process (no restarts in place: the driver's run is lost): the run fails, nothing is committed, its
    # checkpoints stay; the next call resumes from them
    out = tmp_path / "driver" / "mf"
    with pytest.raises(Exception, match="injected failure"):
        train_stage(dataset, mf_stage(), ClusterConfig(workers=1, max_failures=0, **EVERY_2), str(out))
    assert not storage.is_committed(str(out))
    monkeypatch.delenv(FAIL_AT_EPOCH_ENV)
    again = train_stage(dataset, mf_stage(), ClusterConfig(workers=1, max_failures=0, **EVERY_2), str(out))
    assert history_of(out)["attempt"].to_list() == [0, 0] + [1] * (EPOCHS - 2)
    for resumed in (metrics, again):  # the same numbers every way
        for split in ("train", "val", "test"):
            assert resumed[split] == pytest.approx(whole[split], abs=1e-6)
        assert resumed["best_epoch"] == whole["best_epoch"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_checkpointed_only_at_its_end_restarts_from_scratch_to_the_same_metrics(
    ray_cluster, dataset, tmp_path, monkeypatch
) -> None:
    """The default policy (every 30 s) never checkpoints epochs this short: a failure redoes them all."""
    whole = train_stage(dataset, mf_stage(), ClusterConfig(workers=2), str(tmp_path / "whole" / "mf"))
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "3")
    out = tmp_path / "restart" / "mf"
    metrics = train_stage(dataset, mf_stage(), ClusterConfig(workers=2, max_failures=1), str(out))
    assert history_of(out)["attempt"].to_list() == [1] * EPOCHS  # no checkpoint to resume from: a fresh start
    assert metrics["attempts"] == 2
    for split in ("train", "val", "test"):
        assert metrics[split] == pytest.approx(whole[split], abs=1e-6)
    assert whole["overhead"]["checkpoints"] == 1  # the final one only


DRIVER = """
import json, sys
from recdist.config import ClusterConfig, StageConfig
from recdist.train.run import train_stage
stage, cluster = StageConfig.model_validate_json(sys.argv[1]), ClusterConfig.model_validate_json(sys.argv[2])
train_stage(sys.argv[3], stage, cluster, sys.argv[4])
"""


def _registered(root: Path, n: int) -> bool:
    """n checkpoints written under `root` and the newest registered by Ray Train's controller (the latest checkpoint
    of its persisted checkpoint-manager snapshot): a resumed run starts from it."""
    written = sorted(d.name for d in root.glob("*/checkpoint_*") if d.is_dir())  # not checkpoint_manager_snapshot
    snapshots = list(root.glob("*/checkpoint_manager_snapshot.json"))
    if len(written) < n or not snapshots:
        return False
    try:
        latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return False  # being written
    return written[-1] in json.dumps(latest)


def _saved_in_process(root: Path, n: int) -> bool:
    """n checkpoints committed by an in-process fit under `root` (recdist.train.sessions.InProcessSession)."""
    return len([d for d in root.glob("*/in-process/checkpoint-*") if ".staging-" not in d.name]) >= n


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("in_process", [False, True], ids=["ray-train", "in-process"])
def test_a_killed_driver_resumes_from_its_checkpoint_to_the_same_metrics(
    ray_cluster, dataset, tmp_path, in_process
) -> None:
    """A driver process SIGKILLed mid-run (its worker, or itself, stuck in epoch 3 after a checkpoint): the next
    train_stage resumes the same run from the latest checkpoint and ends where an unbroken run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    from recdist.train.run import FAIL_KIND_ENV

    cluster = ClusterConfig(workers=1, in_process=in_process, **EVERY_2)
    stage = mf_stage(epochs=6)
    whole = train_stage(dataset, stage, cluster, str(tmp_path / "whole" / "mf"))
    out = tmp_path / "killed" / "mf"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        FAIL_AT_EPOCH_ENV: "3",  # 0-based: hangs in epoch 3, after the checkpoint of epoch 1 (every 2 epochs)
        FAIL_KIND_ENV: "hang",
    }
    args = [stage.model_dump_json(), cluster.model_dump_json(), dataset, str(out)]
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 900
        saved = _saved_in_process if in_process else _registered
        while not saved(tmp_path / "killed" / "_ray", 1):
            assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before its checkpoints"
            time.sleep(0.5)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert not storage.is_committed(str(out))

    again = train_stage(dataset, stage, cluster, str(out))
    attempts = history_of(out)["attempt"].to_list()
    assert attempts[:2] == [0, 0] and attempts[-1] == 1 and again["attempts"] == 2  # resumed, not restarted
    for split in ("train", "val", "test"):
        assert again[split] == pytest.approx(whole[split], abs=1e-6)
    assert again["best_epoch"] == whole["best_epoch"]


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
            ClusterConfig(max_failures=0, in_process=False),  # raised in a Ray Train worker, unwrapped here
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
    train_stage("data", mf_stage(epochs=1), ClusterConfig(workers=1, in_process=False), "runs/mf")
    assert storage.is_committed(str(tmp_path / "runs" / "mf"))
    result = score("runs/mf", "data", "runs/scored", ScoreOptions(role="mf", actors=1))
    assert storage.is_committed(str(tmp_path / "runs" / "scored"))
    assert result["rows"] == json.loads((tmp_path / "data" / "manifest.json").read_text())["n_ratings"]


def _dims(uri: str):
    from recdist.data import dataset

    return dataset.dims(dataset.read_manifest(uri))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_tasks_scoring_several_shards_each_write_what_the_plain_scorer_writes(
    ray_cluster, dataset, tmp_path
) -> None:
    """One Ray Data task per slot scores its run of shards one after the other: shard n is still written as
    part-n, byte for byte what score_local writes, however many shards each task gets."""
    from recdist.infer.ray_data import score
    from recdist.infer.scored import ScoreOptions, score_local

    train_stage(dataset, mf_stage(epochs=1), ClusterConfig(workers=1), str(tmp_path / "mf"))
    model, options = str(tmp_path / "mf"), ScoreOptions(role="mf")
    score_local(model, dataset, str(tmp_path / "local"), options)
    names = sorted(p.name for p in (Path(dataset) / "ratings").iterdir())
    for tasks in (1, 3):  # 4 shards: all in one task; 2 + 1 + 1
        result = score(model, dataset, str(tmp_path / f"ray{tasks}"), replace(options, actors=tasks))
        assert result["actors"] == tasks and result["files"] == len(names) == 4
        assert sorted(p.name for p in (tmp_path / f"ray{tasks}" / "ratings").iterdir()) == names
        for name in names:
            assert pq.read_table(tmp_path / f"ray{tasks}" / "ratings" / name).equals(
                pq.read_table(tmp_path / "local" / "ratings" / name)
            )
