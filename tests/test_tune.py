"""`recdist tune`: search spaces checked before any trial, then searches through a real local Ray cluster.

Each search starts Ray Train runs (tens of seconds on two shared cores), so the Ray tests are few and each
asserts much: every output of a search, a killed search resuming, best.yaml merged into a pipeline config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
import yaml
from helpers import planted_frame, write_dataset

from recdist import storage
from recdist.config import ClusterConfig, StageConfig, TuneBudget, load_config
from recdist.errors import ConfigError
from recdist.models.space import check_space, merge_space, parse_knob
from recdist.train.cluster import WorkerPlan
from recdist.tune.search import trial_plan, trial_resources, tune_stage
from recdist.tune.trial import EXIT_AFTER_ENV

#: A space small enough for tiny data and two cores: 2-4 epochs, small ranks.
TINY_SPACE = {"train.epochs": {"int": [2, 4]}, "params.rank": [2, 4], "train.solver": "autograd"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("planted") / "data", planted_frame(n_rows=1200), shards=2)


# ------------------------------------------------------------------------------------- before any trial


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"params.rnk": [2, 4]}, "(?s)unknown search knob 'params.rnk'.*did you mean params.rank"),
        ({"train.learning_rate": [0.1]}, "unknown search knob 'train.learning_rate'"),
        ({"rank": [2, 4]}, "a knob is params.<field> or train.<field>"),
        ({"train.lr": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "low must be below high"),
        ({"params.rank": {"int": [2.5, 8]}}, "int takes whole numbers"),
        ({"params.rank": {"normal": [2, 8]}}, "a range is one of"),
        ({"params.rank": []}, "a choice needs at least one value"),
        ({"params.reg": {"uniform": [-0.1, 0.1]}}, r"params.reg .*the value -0.1 is not valid"),
        ({"train.solver": ["sgd", "adam"]}, r"train.solver .*the value 'adam' is not valid"),
    ],
)
def test_a_bad_space_fails_before_any_trial(space, message, tmp_path) -> None:
    stage = StageConfig(model="biased_mf")
    # no dataset, no Ray: the space is refused first
    with pytest.raises(ConfigError, match=message):
        tune_stage(str(tmp_path / "missing"), stage, ClusterConfig(), str(tmp_path / "out"),
                   budget=TuneBudget(space=space))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_every_model_declares_a_valid_space() -> None:
    from recdist.models import registry

    for name in registry.names():
        space = registry.get(name).config.search_space
        assert space, name
        check_space(space, StageConfig(model=name))


def test_space_overrides_add_replace_fix_and_drop() -> None:
    from recdist.models.mf import BiasedMFConfig

    space = merge_space(
        BiasedMFConfig.search_space,
        {"params.rank": [8, 16], "train.lr": 0.01, "params.reg_bias": None,
         "params.init_std": {"uniform": [0.01, 0.2]}},  # fmt: skip
    )
    assert space["params.rank"] == parse_knob("k", [8, 16]) and space["params.rank"].kind == "choice"
    assert space["train.lr"].kind == "fixed" and "params.reg_bias" not in space
    assert space["params.init_std"].kind == "uniform"


def test_trials_are_sized_to_the_cluster() -> None:
    budget = TuneBudget()
    plan, n = trial_plan(ClusterConfig(), budget, {"CPU": 2.0})
    assert n == 2 and 0.9 < plan.cpus_per_worker < 1  # fractional: a core each less the drivers' sliver
    plan, n = trial_plan(ClusterConfig(), TuneBudget(cpus_per_trial=0.5), {"CPU": 2.0})
    assert n == 3 and plan.cpus_per_worker == pytest.approx(0.5, abs=0.01)
    plan, n = trial_plan(ClusterConfig(workers=2), budget, {"CPU": 16.0})
    assert n == 8 and 0.9 < plan.cpus_per_worker < 1  # 16 CPUs: 8 trials of 2 workers
    plan, n = trial_plan(ClusterConfig(workers=1, gpu=True), budget, {"CPU": 8.0, "GPU": 2.0})
    assert n == 2 and plan.gpu and plan.cpus_per_worker == 1
    with pytest.raises(ConfigError, match="GPU"):
        trial_plan(ClusterConfig(workers=2, gpu=True), budget, {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="needs 4 CPUs"):
        trial_plan(ClusterConfig(), TuneBudget(cpus_per_trial=4), {"CPU": 2.0})


def test_a_one_worker_trial_holds_its_worker_share_and_runs_in_process() -> None:
    from recdist.tune.trial import TrialSpec

    def spec(plan: WorkerPlan) -> TrialSpec:
        return TrialSpec("data", {}, None, {}, plan, "out/_ray", "search-x", 0)

    one, two = WorkerPlan(1, 0.99, False), WorkerPlan(2, 1, False)  # type: ignore[arg-type]
    assert spec(one).in_process and not spec(two).in_process
    assert trial_resources(one).bundles == [{"CPU": 1.0}]  # the worker's 0.99 and the driver's sliver
    assert trial_resources(WorkerPlan(1, 1, True)).bundles == [{"CPU": 1.01, "GPU": 1.0}]
    assert trial_resources(two).bundles == [{"CPU": 0.01}]  # its Ray Train workers hold the rest


def test_the_cli_refuses_an_unknown_knob_with_a_clear_message(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recdist", "tune", "--data", str(tmp_path), "--model", "biased_mf", "--out",
         str(tmp_path / "out"), "--space", "params.rnk=[2, 4]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown search knob 'params.rnk'" in result.stderr and "params.rank" in result.stderr
    assert "Traceback" not in result.stderr


def test_best_yaml_merges_into_a_pipeline_config(tmp_path) -> None:
    from recdist.tune.outputs import write_best_yaml

    best = StageConfig(model="biased_mf", params={"rank": 24, "reg": 0.05}, train={"lr": 0.013, "epochs": 7})
    row = {"trial_id": "t1", "val_rmse": 0.9, "best_epoch": 5}
    write_best_yaml(best, "mf", row, 3, "data", str(tmp_path / "best.yaml"))
    base = tmp_path / "pipeline.yaml"
    base.write_text(yaml.safe_dump({"pipeline": {"kind": "single"}, "stages": {"mf": {"params": {"rank": 99}}}}))
    merged = load_config([str(base), str(tmp_path / "best.yaml")])
    assert merged.pipeline.kind == "single"  # the pipeline config's own keys stay
    assert merged.stages.mf.params["rank"] == 24 and merged.stages.mf.train.lr == 0.013
    assert merged.stages.mf.train.epochs == 7 and merged.stages.mf.tune is None
    # and through the CLI, with --config twice
    result = subprocess.run(
        [sys.executable, "-m", "recdist", "config", "--config", str(base), "--config", str(tmp_path / "best.yaml")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["stages"]["mf"]["params"]["rank"] == 24


# ------------------------------------------------------------------------------------- real searches


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_writes_every_output(ray_cluster, dataset, tmp_path) -> None:
    out = tmp_path / "tune"
    stage = StageConfig(model="biased_mf", train={"patience": 0, "lr": 0.05, "batch_size": 256})
    budget = TuneBudget(trials=3, grace_epochs=1, space=TINY_SPACE)
    summary = tune_stage(dataset, stage, ClusterConfig(), str(out), budget=budget, slot="mf")

    trials = pl.read_parquet(out / "trials.parquet")
    assert trials.height == 3 == summary["trials"]
    assert {"trial_id", "status", "val_rmse", "epochs", "best_epoch", "seconds", "params.rank", "train.lr",
            "train.epochs", "params.reg"} <= set(trials.columns)  # fmt: skip
    assert trials["val_rmse"].to_list() == sorted(trials["val_rmse"].to_list())  # best first
    assert set(trials["status"]) <= {"finished", "stopped"} and trials["seconds"].min() > 0
    assert trials["epochs"].max() <= 4 and trials["params.rank"].is_in([2, 4]).all()

    best = yaml.safe_load((out / "best.yaml").read_text())["stages"]["mf"]
    assert best["model"] == "biased_mf" and best["train"]["solver"] == "autograd"
    assert best["params"]["rank"] == trials["params.rank"][0] and best["train"]["lr"] == trials["train.lr"][0]
    assert (out / "val_rmse.png").read_bytes()[:4] == b"\x89PNG"

    # best/ is a `recdist train` run of the best settings
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert {"model.safetensors", "model.json", "history.parquet", "learning_curve.png", "manifest.json"} <= {
        p.name for p in (out / "best").iterdir()
    }
    assert metrics["params"]["rank"] == best["params"]["rank"] and metrics["test"]["rmse"] > 0
    assert metrics["val"]["rmse"] == pytest.approx(trials["val_rmse"][0], abs=0.02)  # the same run, retrained
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "tune" and manifest["best_run"]["test"] == metrics["test"]
    assert not (out / "_ray").exists()  # the search's state and trial checkpoints are removed once committed

    # the same search again is the committed one; another one is refused without --overwrite
    again = tune_stage(dataset, stage, ClusterConfig(), str(out), budget=budget, slot="mf")
    assert again["search"] == summary["search"]
    with pytest.raises(Exception, match="already exists"):
        tune_stage(dataset, stage, ClusterConfig(), str(out), budget=TuneBudget(trials=2, space=TINY_SPACE))


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_search_resumes(ray_cluster, dataset, tmp_path) -> None:
    out = tmp_path / "tune"
    args = ["tune", "--data", dataset, "--model", "biased_mf", "--out", str(out), "--trials", "3",
            "--set", "stages.mf.train.patience=0", "--set", "stages.mf.train.batch_size=256"]  # fmt: skip
    for key, value in TINY_SPACE.items():
        args += ["--space", f"{key}={json.dumps(value)}"]
    env = {**os.environ, EXIT_AFTER_ENV: "1"}
    env.pop("RAY_ADDRESS", None)
    killed = subprocess.run([sys.executable, "-m", "recdist", *args], env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert killed.returncode == 3, killed.stderr[-3000:]  # died after its first trial, without cleaning up
    assert not storage.is_committed(str(out))
    # one-worker trials ran the worker loop in their own processes: the search's state alone, no Ray Train run
    # beside it, and the finished trial's checkpoint (its final state) among the search's trials
    (search,) = (out / "_ray").iterdir()
    assert search.name.startswith("search-") and list(search.glob("*/checkpoint_*/progress.json"))

    from recdist.cli import main

    with pytest.raises(SystemExit) as done:
        main([*args, "--quiet"])
    assert done.value.code in (0, None)
    trials = pl.read_parquet(out / "trials.parquet")
    assert trials.height == 3 and trials["val_rmse"].is_not_null().all()
    summary = json.loads((out / "manifest.json").read_text())
    assert summary["resumed"] and summary["trials"] == 3 and (out / "best" / "metrics.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_stage_tune_section_retunes_it_in_the_pipeline(ray_cluster, dataset, tmp_path, monkeypatch) -> None:
    from recdist.pipeline import STOP_AFTER_ENV, run_pipeline

    monkeypatch.setenv(STOP_AFTER_ENV, "single")  # the tiny dataset has no users/items tables for the outputs

    cfg = load_config(
        None,
        {
            "pipeline.kind": "single",
            "pipeline.top_n": 5, "pipeline.similar_k": 4, "pipeline.similar_min_ratings": 2, "pipeline.infer_actors": 1,
            "stages.single": {"model": "biased_mf", "train": {"patience": 0, "lr": 0.05, "batch_size": 256},
                              "tune": {"trials": 2, "grace_epochs": 1, "space": TINY_SPACE}},
        },
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="stopped after stage single"):
        run_pipeline(cfg, str(tmp_path / "run"), data=dataset)
    tuned = json.loads((tmp_path / "run" / "single" / "tune" / "manifest.json").read_text())
    assert tuned["trials"] == 2 and tuned["best_run"] is None  # the pipeline trains the stage itself
    stage = json.loads((tmp_path / "run" / "single" / "manifest.json").read_text())["config"]
    assert stage["params"]["rank"] == tuned["best_values"]["params.rank"] and stage["train"]["solver"] == "autograd"
