"""The training loop without Ray: planted low-rank ratings the trainer must recover, early stopping,
reproducibility, checkpoint round trips, the rank's data loader, history files and the cluster check."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from helpers import N_ITEMS, N_USERS, planted_frame, write_dataset

from recdist.config import ClusterConfig, StageConfig, TrainConfig
from recdist.errors import ConfigError, DataError
from recdist.models.batch import Dims
from recdist.train import checkpoint, history
from recdist.train.cluster import plan
from recdist.train.data import RankData, load_rank_data, split_batches
from recdist.train.loop import Trainer
from recdist.train.run import build_model, model_from_state
from recdist.train.solvers import AutogradSolver, Problem, make_solver


def rank_data(frame: pl.DataFrame) -> RankData:
    parts = split_batches(frame, "rating", (), torch.device("cpu"))
    dims = Dims(N_USERS, N_ITEMS, global_mean=float(parts["train"].target.mean()))
    return RankData(parts["train"], parts["val"], parts["test"], dims)


@pytest.fixture(scope="module")
def planted() -> RankData:
    return rank_data(planted_frame())


def make_trainer(data: RankData, model: str = "biased_mf", params: dict | None = None, **train) -> Trainer:
    settings = {"solver": "autograd", "lr": 0.05, "batch_size": 256, "epochs": 12, "lr_schedule": "constant"}
    stage = StageConfig(model=model, params=params or {"rank": 8}, train=TrainConfig(**{**settings, **train}))
    return Trainer(build_model(stage, data.dims), stage.train, data)


def test_trainer_recovers_planted_ratings(planted: RankData) -> None:
    trainer = make_trainer(planted)
    rows = trainer.fit()
    mean_rmse = float((planted.val.target - planted.train.target.mean()).square().mean().sqrt())
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    final = trainer.final_metrics()
    assert final["val"]["rmse"] < 0.8 * mean_rmse  # the planted structure is learnt, not just the mean
    assert final["test"]["rmse"] < 0.8 * mean_rmse
    assert set(rows[0]) == {"epoch", "train_loss", "val_rmse", "val_mae", "rows_per_s", "lr", "seconds"}
    assert [r["epoch"] for r in rows] == list(range(len(rows)))


@pytest.mark.parametrize("model", ["biased_mf", "sigmoid_mf"])
def test_the_fused_kernel_evaluates_like_the_models_forward(planted: RankData, model: str, monkeypatch) -> None:
    """Trainer.evaluate scores MF-family models with the fused kernel on a CPU: the same figures as forward()."""
    from recdist.train import loop

    trainer = make_trainer(planted, model, epochs=2)
    trainer.fit()
    assert loop.kernel_for(trainer.model) is not None
    splits = ("train", "val", "test")
    fused = {split: trainer.evaluate(split) for split in splits}
    monkeypatch.setattr(loop, "kernel_for", lambda model: None)
    plain = {split: trainer.evaluate(split) for split in splits}
    for split in splits:
        assert fused[split] == pytest.approx(plain[split], rel=1e-6)


def test_the_final_validation_figures_are_the_best_epochs(planted: RankData) -> None:
    """After fit() the weights are the best epoch's again: final_metrics reports the validation figures taken when
    that epoch was chosen (not a second pass over the split), and they are what the restored weights score."""
    trainer = make_trainer(planted, epochs=6, lr=0.3)  # validation: ... 0.5469, 0.4194 (best), 0.4242
    rows = trainer.fit()
    assert trainer.best_epoch < len(rows) - 1  # later epochs were worse: fit() put the best one's weights back
    best = rows[trainer.best_epoch]
    val = trainer.final_metrics()["val"]
    assert val == {"rmse": best["val_rmse"], "mae": best["val_mae"]}
    assert trainer.evaluate("val") == val  # the restored weights score exactly that
    trainer.train_epoch()  # the weights moved on: validation is scored again
    assert trainer.final_metrics()["val"] == trainer.evaluate("val") != val


def test_zero_epochs_keep_the_starting_weights_and_evaluate_them(planted: RankData) -> None:
    """epochs = 0 (a warm stage 2 or 3 keeping yesterday's weights): no step, the final metrics are the start's."""
    trainer = make_trainer(planted, epochs=0)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit() == [] and trainer.best_epoch == -1
    assert all(torch.equal(v, start[k]) for k, v in trainer.model.state_dict().items())
    mean_rmse = float((planted.val.target - planted.train.target.mean()).square().mean().sqrt())
    assert trainer.final_metrics()["val"]["rmse"] == pytest.approx(trainer.evaluate("val")["rmse"])
    assert trainer.final_metrics()["val"]["rmse"] > 0.9 * mean_rmse  # untrained: nothing learnt


def test_a_trainer_without_epochs_builds_no_optimiser(planted: RankData, tmp_path) -> None:
    """The optimisers are built at the first step: a zero-epoch fit, its evaluation and its checkpoint never
    import torch._dynamo (1.6 s per process, which torch.optim's first call costs); a state saved before any
    step resumes into a run that trains as a fresh one does."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from test_train import make_trainer, planted_frame, rank_data\n"
        "trainer = make_trainer(rank_data(planted_frame()), epochs=0)\n"
        "trainer.fit(); trainer.final_metrics(); trainer.state_dict()\n"
        "assert trainer.solver.state_dict()['optimizers'] == []\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tests, check=True)
    assert done.stdout.strip() == "False", done.stderr[-2000:]

    checkpoint.save_state(make_trainer(planted, epochs=0).state_dict(), str(tmp_path), attempt=0)
    resumed = make_trainer(planted, epochs=2)
    resumed.load_state_dict(checkpoint.load_state(str(tmp_path)))
    drop = ("seconds", "rows_per_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in resumed.fit()]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in make_trainer(planted, epochs=2).fit()]


def test_imports_load_in_the_background() -> None:
    """imports.prefetch imports what is missing in one thread (a rank about to build a torch.optim optimiser:
    torch._dynamo, while it loads its data); a module that fails to import is left to the foreground's import."""
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from recdist import imports\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "imports.prefetch('no_such_module_here', 'torch._dynamo')\n"
        "threads = [t for t in threading.enumerate() if t.name == 'recdist-imports']\n"
        "[t.join() for t in threads]\n"
        "imports.prefetch('torch._dynamo', 'json')\n"
        "print(len(threads), 'torch._dynamo' in sys.modules, threading.active_count())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "True", "1"] and not done.stderr, done.stderr[-2000:]


def test_early_stopping_restores_best_epoch(planted: RankData) -> None:
    # no regularisation, a wide rank and a high learning rate: overfits after a few epochs
    trainer = make_trainer(planted, params={"rank": 48, "reg": 0.0, "reg_bias": 0.0}, lr=0.1, epochs=40, patience=2)
    rows = trainer.fit()
    assert trainer.stopped and len(rows) < 40
    assert trainer.best_epoch == len(rows) - 1 - 2  # two epochs without improvement, then stop
    best = min(r["val_rmse"] for r in rows)
    assert rows[trainer.best_epoch]["val_rmse"] == best
    assert trainer.evaluate("val")["rmse"] == pytest.approx(best, abs=1e-6)  # the best weights are back
    assert rows[-1]["val_rmse"] > best


def test_same_seed_same_numbers(planted: RankData) -> None:
    a = make_trainer(planted, epochs=3, seed=3).fit()
    b = make_trainer(planted, epochs=3, seed=3).fit()
    c = make_trainer(planted, epochs=3, seed=4).fit()
    drop = ("seconds", "rows_per_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert strip != [{k: v for k, v in r.items() if k not in drop} for r in c]


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_checkpoint_round_trip_continues_identically(planted: RankData, tmp_path, schedule: str) -> None:
    settings = {"epochs": 6, "lr_schedule": schedule, "optimizer": "adam", "patience": 0}
    whole = make_trainer(planted, **settings).fit()

    first = make_trainer(planted, **settings)
    for _ in range(3):
        first.train_epoch()
    checkpoint.save_state(first.state_dict(), str(tmp_path), attempt=0)
    second = make_trainer(planted, **settings)  # a fresh process: new model, new solver
    second.load_state_dict(checkpoint.load_state(str(tmp_path)))
    assert second.epoch == 3
    resumed = second.fit()
    drop = ("seconds", "rows_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole
    ]


def test_checkpoint_policy_picks_epochs_and_elapsed_time() -> None:
    every_2 = checkpoint.CheckpointPolicy(every_epochs=2, every_seconds=0)
    assert [every_2.due(done, 1e9) for done in range(1, 7)] == [False, True, False, True, False, True]
    by_time = checkpoint.CheckpointPolicy(every_epochs=0, every_seconds=30)
    assert not by_time.due(5, 29.9) and by_time.due(5, 30.0)
    either = checkpoint.CheckpointPolicy(every_epochs=3, every_seconds=10)
    assert either.due(3, 0.0) and either.due(1, 10.0) and not either.due(2, 9.0)
    final_only = checkpoint.CheckpointPolicy(every_epochs=0, every_seconds=0)
    assert not any(final_only.due(done, 1e9) for done in range(1, 50))
    assert checkpoint.CheckpointPolicy().due(1, 0.0)  # the default for direct callers: every epoch
    assert ClusterConfig().checkpoint_every_epochs == 0 and ClusterConfig().checkpoint_every_seconds == 30


def test_optimisers_and_clipping_train(planted: RankData) -> None:
    for optimizer in ("adamw", "adagrad", "sgd"):
        lr = {"sgd": 0.05, "adagrad": 0.1, "adamw": 0.05}[optimizer]
        rows = make_trainer(planted, epochs=4, optimizer=optimizer, lr=lr, grad_clip=1.0).fit()
        assert rows[-1]["train_loss"] < rows[0]["train_loss"], optimizer


def test_model_rebuilt_from_checkpoint_state_predicts_the_same(planted: RankData) -> None:
    trainer = make_trainer(planted, epochs=2)
    trainer.fit()
    stage = StageConfig(model="biased_mf", params={"rank": 8})
    model = model_from_state(stage, planted.dims, trainer.state_dict()["model"])
    torch.testing.assert_close(model(planted.val), trainer.model.eval()(planted.val))


def test_auto_solver_choice(planted: RankData) -> None:
    sgd = pytest.importorskip("recdist.train.sgd")
    cfg = TrainConfig(solver="auto")
    mf = build_model(StageConfig(model="biased_mf"), planted.dims)
    assert isinstance(make_solver(Problem(mf, cfg, planted)), sgd.SGDSolver)
    ncf = build_model(StageConfig(model="ncf_mlp"), planted.dims)
    assert isinstance(make_solver(Problem(ncf, cfg, planted)), AutogradSolver)
    with pytest.raises(ConfigError, match="cannot train"):
        make_solver(Problem(ncf, TrainConfig(solver="sgd"), planted))


def test_torch_sgd_kernel_learns_the_planted_ratings(planted: RankData) -> None:
    """The whole-batch SGD kernel (the CUDA path of the sgd solver) runs on CPU too: it must learn the same."""
    from recdist.train.sgd import SGDSolver

    stage = StageConfig(model="biased_mf", params={"rank": 8}, train=TrainConfig(epochs=12, batch_size=256, lr=0.05))
    model = build_model(stage, planted.dims)
    solver = SGDSolver(Problem(model, stage.train, planted), kernel="torch")
    trainer = Trainer(model, stage.train, planted, solver=solver)
    rows = trainer.fit()
    mean_rmse = float((planted.val.target - planted.train.target.mean()).square().mean().sqrt())
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert trainer.final_metrics()["val"]["rmse"] < 0.8 * mean_rmse


def test_sgd_sub_blocks_fit_the_cache_and_learn_the_same(planted: RankData, monkeypatch) -> None:
    """Where a block's factor rows outgrow CACHE_BYTES the numba kernel runs each block as T x T sub-blocks: every
    sub-block holds only its users' and items' ratings, all ratings are visited once an epoch, the planted ratings
    are learnt as well as with whole blocks, and a fit is reproducible."""
    import numpy as np

    from recdist.train import sgd

    assert sgd.tiles_for(138_493, 26_744, 32, 8) == 6  # ML-20M, rank 32: 21.8 MB of rows over 8 x 8 blocks
    assert sgd.tiles_for(610, 9_742, 32, 8) == 1  # ml-latest-small: a block's rows fit already
    stage = StageConfig(model="biased_mf", params={"rank": 8}, train=TrainConfig(epochs=12, lr=0.05))

    def fit(cache: int) -> tuple[sgd.SGDSolver, float, torch.Tensor]:
        monkeypatch.setattr(sgd, "CACHE_BYTES", cache)
        torch.manual_seed(0)
        model = build_model(stage, planted.dims)
        solver = sgd.SGDSolver(Problem(model, stage.train, planted))
        trainer = Trainer(model, stage.train, planted, solver=solver)
        trainer.fit()
        return solver, trainer.final_metrics()["val"]["rmse"], model.state_dict()["user_factors.weight"].clone()

    whole, whole_rmse, _ = fit(1 << 30)
    tiled, tiled_rmse, factors = fit(64)
    assert whole.tiles == 1 and tiled.tiles > 2
    T2, S = tiled.tiles**2, tiled.strata
    assert len(tiled.offsets) == S * S * T2 + 1 and tiled.offsets[-1] == len(planted.train.user)
    rows = {tuple(t) for t in np.stack([tiled.users, tiled.items], 1).tolist()}
    assert len(rows) == len(planted.train.user)  # every training rating once
    T = tiled.tiles
    for block in range(S * S):  # within a block, sub-blocks of different user (item) tiles share no user (item)
        users, items = {}, {}
        for sub in range(T2):
            lo, hi = tiled.offsets[block * T2 + sub], tiled.offsets[block * T2 + sub + 1]
            for tile, seen, ids in ((sub // T, users, tiled.users), (sub % T, items, tiled.items)):
                for x in ids[lo:hi].tolist():
                    assert seen.setdefault(x, tile) == tile
    mean_rmse = float((planted.val.target - planted.train.target.mean()).square().mean().sqrt())
    assert tiled_rmse < 0.8 * mean_rmse and abs(tiled_rmse - whole_rmse) < 0.05 * whole_rmse
    assert torch.equal(fit(64)[2], factors)  # reproducible


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sgd_bucketing_is_a_stable_sort_by_sub_block_user_and_item(threads: int) -> None:
    """The solver's ratings, whatever the threads that place and sort them: by sub-block, then user, then item,
    a repeated (user, item) pair in input order (a stable lexicographic sort), with each sub-block's offsets."""
    import numpy as np

    from recdist.train import sgd

    rng = np.random.default_rng(threads)
    n_users, n_items, S, T, n = 70, 40, 3, 2, 5_000
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    users[:50], items[:50] = users[50:100], items[50:100]  # repeated pairs
    ratings = np.arange(n, dtype=np.float32)  # each row's input position
    ugroup, igroup = rng.integers(0, S, n_users).astype(np.int32), rng.integers(0, S, n_items).astype(np.int32)
    utile, itile = rng.integers(0, T, n_users).astype(np.int32), rng.integers(0, T, n_items).astype(np.int32)
    got = sgd._bucket(users, items, ratings, ugroup, igroup, S, n_items, utile, itile, T, threads)
    got_u, got_i, got_r, offsets = got

    sub = ((ugroup[users] * S + igroup[items]) * T + utile[users]) * T + itile[items]
    order = np.lexsort((np.arange(n), items, users, sub))
    assert np.array_equal(got_u, users[order]) and np.array_equal(got_i, items[order])
    assert np.array_equal(got_r, ratings[order])  # ties in input order
    assert np.array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(sub, minlength=S * S * T * T))]))


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_sgd_per_row_rates_move_new_rows_alone_faster(planted: RankData, kernel: str) -> None:
    """warm_rows: rows at rate 0 stay where they are, rows at rate 1 move as without it, and a higher rate moves
    its rows further (a warm fit's new users and movies train at the cold rate)."""
    from recdist.train.sgd import SGDSolver

    stage = StageConfig(model="biased_mf", params={"rank": 4}, train=TrainConfig(epochs=1, lr=0.01, batch_size=64))

    def one_epoch(rates: dict[str, float]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(stage, planted.dims)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        solver = SGDSolver(Problem(model, stage.train, planted), kernel=kernel)
        users = torch.zeros(N_USERS, dtype=torch.bool)
        users[:5] = True
        if rates:
            solver.warm_rows(np.where(users.numpy(), rates["new"], 1.0), np.ones(N_ITEMS, np.float32))
        solver.train_epoch(0)
        return {k: (v - before[k]).abs().sum(-1) if v.dim() > 1 else (v - before[k]).abs() for k, v in
                model.state_dict().items()}

    plain, frozen, fast = one_epoch({}), one_epoch({"new": 0.0}), one_epoch({"new": 5.0})
    moved = "user_factors.weight"
    assert torch.equal(one_epoch({"new": 1.0})[moved], plain[moved])
    assert (frozen[moved][:5] == 0).all() and (frozen[moved][5:] > 0).all()
    assert (fast[moved][:5] > 2 * plain[moved][:5]).all()


def test_train_command_keeps_set_params_and_refuses_a_gpu_before_work(tmp_path, monkeypatch, capsys) -> None:
    """`recdist train --model M --set stages.single.params.X=..` trains M with X; --gpu without one exits 2
    with the fix, before any dataset is read or worker started."""
    import recdist.train.run as run
    from recdist.cli import main

    seen = {}
    monkeypatch.setattr(run, "train_stage", lambda data, stage, cluster, out, **kw: seen.update(stage=stage) or {})
    with pytest.raises(SystemExit) as done:
        main(["train", "--data", "d", "--out", "o", "--model", "biased_mf", "--set", "stages.single.params.rank=16",
              "--set", "stages.single.train.lr=0.03", "--quiet"])  # fmt: skip
    assert done.value.code == 0
    assert seen["stage"].model == "biased_mf" and seen["stage"].params == {"rank": 16}
    assert seen["stage"].train.lr == 0.03

    monkeypatch.undo()
    import ray

    data = write_dataset(tmp_path / "data", planted_frame(n_rows=200))
    ray_was_up = ray.is_initialized()  # the session's Ray cluster may be up when the whole suite runs
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", data, "--out", str(tmp_path / "run" / "o"), "--model", "biased_mf", "--gpu", "-q"])
    assert exit_.value.code == 2
    assert "no GPUs" in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "run").exists()  # nothing started or written


def test_models_that_read_the_training_rows_get_all_of_them() -> None:
    from recdist.models import get

    assert get("reliability_mlp").module.needs_context
    assert get("autoencoder").module.needs_context
    assert not get("biased_mf").module.needs_context


def test_history_files(tmp_path) -> None:
    rows = [
        {
            "epoch": e,
            "train_loss": 1.0 / (e + 1),
            "val_rmse": 1.1 - 0.1 * e,
            "val_mae": 0.9,
            "rows_per_s": 1e5,
            "lr": 0.01,
            "seconds": 0.5,
            "attempt": int(e >= 2),
        }
        for e in range(4)
    ]
    rows.append({**rows[-1], "epoch": 4, "val_rmse": float("nan"), "val_mae": float("nan")})
    history.write_history(rows, str(tmp_path / "history.parquet"))
    table = pq.read_table(tmp_path / "history.parquet")
    assert table.schema == history.HISTORY
    assert table["epoch"].to_pylist() == [0, 1, 2, 3, 4]
    assert table["attempt"].to_pylist() == [0, 0, 1, 1, 1]
    assert table["val_rmse"].to_pylist()[-1] is None
    png = history.learning_curve_png(rows, "biased_mf")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size == (640, 400)


def test_cluster_plan_checks_before_work() -> None:
    assert plan(ClusterConfig(workers=2), {"CPU": 4}).cpus_per_worker == 2
    assert plan(ClusterConfig(workers=3), {"CPU": 4}).resources_per_worker() == {"CPU": 1.0}
    with pytest.raises(ConfigError, match="no GPUs"):
        plan(ClusterConfig(gpu=True), {"CPU": 4})
    with pytest.raises(ConfigError, match="2 workers x 3 CPUs"):
        plan(ClusterConfig(workers=2, cpus_per_worker=3), {"CPU": 4})
    with pytest.raises(ConfigError, match="workers"):
        plan(ClusterConfig.model_construct(workers=0, gpu=False, cpus_per_worker=None), {"CPU": 4})
    assert plan(ClusterConfig(workers=2, gpu=True), {"CPU": 8, "GPU": 2}).resources_per_worker() == {
        "CPU": 4.0,
        "GPU": 1.0,
    }
    # one rank on this machine trains in this process unless told otherwise; a cluster keeps Ray Train's placement
    assert plan(ClusterConfig(), {"CPU": 4}).in_process
    assert not plan(ClusterConfig(), {"CPU": 4}, local=False).in_process
    assert not plan(ClusterConfig(in_process=False), {"CPU": 4}).in_process
    assert plan(ClusterConfig(in_process=True), {"CPU": 4}, local=False).in_process
    with pytest.raises(ConfigError, match="in_process trains one rank"):
        plan(ClusterConfig(workers=2, in_process=True), {"CPU": 4})


def test_an_in_process_stage_trains_in_ray_trains_local_mode_and_starts_no_ray(tmp_path, monkeypatch) -> None:
    """One worker on this machine: train_stage runs a TorchTrainer of no workers (Ray Train's local mode), whose
    train_worker is rank 0 of 1 in this process (Ray Train's context says so) and hands the driver the checkpoint
    it persisted; no Ray cluster starts (and a Ray session an earlier test left is neither used nor stopped)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from recdist.train import run

    ray_before = ray.is_initialized()  # a Ray session of an earlier test stays as it was, none starts
    seen, workers, original = {}, [], run.run_worker

    def spy(config, session):
        ctx = ray.train.get_context()
        seen.update(rank=ctx.get_world_rank(), world=ctx.get_world_size(), context=type(ctx).__name__)
        seen.update(session=type(session).__name__, root=config["in_process"])
        original(config, session)

    built = TorchTrainer.__init__

    def init(self, *args, **kwargs):
        workers.append(kwargs["scaling_config"].num_workers)
        built(self, *args, **kwargs)

    monkeypatch.setattr(run, "run_worker", spy)
    monkeypatch.setattr(TorchTrainer, "__init__", init)
    data = write_dataset(tmp_path / "data", planted_frame())
    stage = StageConfig(model="biased_mf", params={"rank": 4}, train=TrainConfig(epochs=2))
    metrics = run.train_stage(data, stage, ClusterConfig(workers=1), str(tmp_path / "mf"))
    assert workers == [0] and ray.is_initialized() == ray_before
    assert seen == {"rank": 0, "world": 1, "context": "LocalTrainContext", "session": "InProcessSession",
                    "root": seen["root"]}  # fmt: skip
    assert seen["root"].startswith(str(tmp_path / "_ray")) and seen["root"].endswith("/in-process")
    assert metrics["epochs"] == 2 and metrics["workers"] == 1
    assert (tmp_path / "mf" / "model.safetensors").exists() and (tmp_path / "mf" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------- rank loading


def test_load_rank_data_shards_and_splits(tmp_path) -> None:
    pytest.importorskip("recdist.data.dataset")
    frame = planted_frame(n_rows=400)
    uri = write_dataset(tmp_path / "data", frame, shards=2)
    ranks = [load_rank_data(uri, target="rating", rank=r, world=2) for r in range(2)]
    assert sum(len(d.train) + len(d.val) + len(d.test) for d in ranks) == 400
    assert sum(len(d.train) for d in ranks) == frame.filter(pl.col("split") == "train").height
    assert ranks[0].train.user.dtype == torch.int64 and ranks[0].train.target.dtype == torch.float32
    assert ranks[0].dims.n_users == N_USERS and ranks[0].context is None
    whole = load_rank_data(uri, target="rating", rank=1, world=2, context=True)
    assert len(whole.context) == frame.filter(pl.col("split") == "train").height


def test_load_rank_data_names_missing_columns(tmp_path) -> None:
    pytest.importorskip("recdist.data.dataset")
    uri = write_dataset(tmp_path / "data", planted_frame(n_rows=100))
    with pytest.raises(DataError, match="no column.*error") as err:
        load_rank_data(uri, target="error")
    assert "scored output" in str(err.value)


# ------------------------------------------------------------------------------------ two ranks, no Ray


def _digest(model: torch.nn.Module) -> str:
    """A hash of every tensor of a model's state: equal digests, bit-identical models."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


TWO_RANKS = {
    "autograd": {"solver": "autograd"},
    "sgd": {"solver": "sgd", "lr": 0.02, "lr_schedule": "cosine"},
    "gibbs": {"solver": "gibbs", "gibbs": {"rank": 3, "burn_in": 1, "thin": 1}},  # every rank draws the same sample
}


def _ddp_rank(rank: int, world: int, init: str, out: str, solver: str) -> None:
    """One gloo rank: a 2:1 uneven share of the planted rows, three epochs, results to a JSON file."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    frame = planted_frame()
    mine = frame.with_row_index().filter((pl.col("index") % 3 == 0) == (rank == 1)).drop("index")
    full = rank_data(frame)
    part = rank_data(mine)
    data = RankData(part.train, part.val, part.test, full.dims)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(data, epochs=3, batch_size=128, patience=0, **TWO_RANKS[solver])
        rows = trainer.fit()
    said = [str(w.message) for w in caught]
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rows": rows, "digest": _digest(trainer.model), "n": len(data.train), "warnings": said}, f)
    del trainer  # as run_worker does: DDP (in a reference cycle) goes before the process group, or exit may abort
    gc.collect()
    tdist.destroy_process_group()


def _worker_rank(rank: int, world: int, init: str, data: str, root: str) -> None:
    """One gloo rank through run_worker (automatic collection off: only run_worker's own frees a cycle)."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from recdist.train.run import run_worker
    from recdist.train.sessions import InProcessSession

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    session = InProcessSession(f"{root}/rank-{rank}")
    session.rank, session.world = rank, world
    stage = StageConfig(model="biased_mf", params={"rank": 4}, train=TrainConfig(solver="autograd", epochs=2))
    config = {"data": data, "stage": stage.model_dump(mode="json"), "upstream": None, "cpus_per_worker": 1,
              "gpu": False, "warm_start": None}  # fmt: skip
    gc.disable()
    run_worker(config, session)
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
        warnings.simplefilter("ignore", FutureWarning)
        alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    with open(f"{root}/alive.{rank}", "w") as f:
        json.dump({"ddp_alive": alive, "checkpoint": session.last is not None}, f)
    tdist.destroy_process_group()


@pytest.mark.parametrize("cycle", [False, True], ids=["freed-by-refcount", "held-by-a-cycle"])
def test_a_single_rank_frees_its_trainer_when_its_loop_returns(tmp_path, monkeypatch, cycle: bool) -> None:
    """run_worker in this process (one rank, automatic collection off): no Trainer outlives the loop, whether
    reference counting frees it or a reference cycle holds it (as a traceback caught inside PyTorch's first
    optimiser can): then run_worker collects, and only then."""
    from recdist.train import run
    from recdist.train.sessions import InProcessSession

    if cycle:
        init = Trainer.__init__

        def cyclic(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.cycle = self

        monkeypatch.setattr(Trainer, "__init__", cyclic)
    collections, collect = [], gc.collect
    monkeypatch.setattr(run.gc, "collect", lambda: collections.append(1) or collect())
    data = write_dataset(tmp_path / "data", planted_frame())
    stage = StageConfig(model="biased_mf", params={"rank": 4}, train=TrainConfig(solver="autograd", epochs=2))
    config = {"data": data, "stage": stage.model_dump(mode="json"), "upstream": None, "cpus_per_worker": 1,
              "gpu": False, "warm_start": None}  # fmt: skip
    collect()
    gc.disable()
    try:
        run.run_worker(config, session := InProcessSession(str(tmp_path / "run")))
        assert session.last is not None
        with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op warns
            warnings.simplefilter("ignore", FutureWarning)
            assert not [o for o in gc.get_objects() if isinstance(o, Trainer)]
        assert len(collections) == cycle
    finally:
        gc.enable()


@pytest.mark.slow
def test_a_worker_frees_its_ddp_before_the_process_group_goes(tmp_path) -> None:
    """run_worker leaves no DistributedDataParallel behind: one destroyed after its process group (Ray Train
    destroys the group once the loop returns) aborted the rank's process at exit."""
    import torch.multiprocessing as mp

    data = write_dataset(tmp_path / "data", planted_frame())
    mp.spawn(_worker_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", data, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):  # only rank 0 writes checkpoints
        assert json.loads((tmp_path / f"alive.{rank}").read_text()) == {"ddp_alive": 0, "checkpoint": rank == 0}


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["autograd", "sgd", "gibbs"])
def test_two_gloo_ranks_with_uneven_shards_stay_in_step(tmp_path, solver: str) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_ddp_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out, solver), nprocs=2, join=True)
    a, b = (json.loads(open(f"{out}.{r}").read()) for r in range(2))
    assert a["n"] != b["n"]  # uneven shards: the same number of steps anyway, or DDP would hang
    assert not [w for w in a["warnings"] + b["warnings"] if "broadcast_buffers" in w]  # quiet workers' logs
    drop = ("seconds", "rows_per_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in a["rows"]]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in b["rows"]]
    # global metrics: every rank sees the same figures
    assert a["digest"] == b["digest"]  # the replicas stay identical
    assert a["rows"][-1]["val_rmse"] < a["rows"][0]["val_rmse"]
    if solver == "sgd":  # DSGD runs the same blocks whichever rank owns them: one process computes the same
        single = make_trainer(rank_data(planted_frame()), epochs=3, batch_size=128, patience=0, **TWO_RANKS[solver])
        rows = single.fit()
        assert _digest(single.model) == a["digest"]
        for one, two in zip(rows, strip, strict=True):  # evaluation sums rank by rank in float32: equal up to rounding
            assert one["train_loss"] == two["train_loss"]
            assert one["val_rmse"] == pytest.approx(two["val_rmse"], rel=1e-6)


def test_epoch_lines_of_stages_sharing_a_queue_all_show_and_each_pump_stops_at_its_end(monkeypatch, caplog) -> None:
    """Stages of a Ray session share one progress queue: every row a stage put shows in its own lines, and its
    pump stops on the end marker its exit puts behind them, without waiting for an empty poll (a get that would
    block forever still returns)."""
    import logging
    import queue
    import threading

    from recdist.train import run

    class Blocking(queue.Queue):  # a poll that never times out: only a row or the end marker returns
        def get(self, block: bool = True, timeout: float | None = None):
            return super().get(block=True)

    shared = Blocking()
    monkeypatch.setattr(run, "_progress_queue", lambda: shared)
    row = {"train_loss": 0.5, "val_rmse": 0.9, "val_mae": 0.7, "rows_per_s": 1000.0, "lr": 0.01}
    caplog.set_level(logging.INFO, logger=run.log.name)
    for label, epochs in (("first", 3), ("second", 2)):
        with run.EpochProgress(epochs, label) as progress:
            for epoch in range(epochs):
                shared.put({**row, "epoch": epoch})
            pump = progress._thread
        assert isinstance(pump, threading.Thread) and not pump.is_alive()
    lines = [r.getMessage() for r in caplog.records if "epoch " in r.getMessage()]
    assert [line.split(" train")[0] for line in lines] == [
        "first: epoch 1/3", "first: epoch 2/3", "first: epoch 3/3", "second: epoch 1/2", "second: epoch 2/2",
    ]  # fmt: skip
    assert shared.empty()


def test_a_fold_models_epochs_show_as_progress_and_one_trained_line(caplog) -> None:
    """The cross-fitting fold models (five more fits of stage 1) log no line per epoch, only `done of total`
    progress every few seconds on long fits, and the pipeline's one `trained:` line per model."""
    import logging

    from recdist.train import run

    caplog.set_level(logging.INFO, logger=run.log.name)
    row = {"train_loss": 0.5, "val_rmse": 0.9, "val_mae": 0.7, "rows_per_s": 1000.0, "lr": 0.01}
    with run.EpochProgress(40, "fold", local=True, lines=False) as progress:
        for epoch in range(40):
            progress.queue.put({**row, "epoch": epoch})
    assert not [r for r in caplog.records if "epoch " in r.getMessage()]
    metrics = {"val": {"rmse": 0.85731}, "epochs": 40, "best_epoch": 37, "seconds": 0.21}
    assert run.trained_line(metrics) == "trained: 40 epochs (best 38), val RMSE 0.8573, 0.2 s"
    assert run.trained_line({**metrics, "val": {"rmse": None}}).endswith("no validation rows, 0.2 s")


def test_final_metrics_measure_validation_and_the_splits_asked_for_only() -> None:
    """Trainer.final_metrics(splits): validation always (the warm start's check reads it), train and test only when
    asked (the pipeline's stages 2 and 3 leave them to the outputs stage's scored tables)."""
    from recdist.train.loop import Trainer

    trainer = Trainer.__new__(Trainer)
    asked: list[str] = []
    trainer._best_val = None
    trainer.evaluate = lambda split: asked.append(split) or {"rmse": 1.0, "mae": 0.5}
    assert trainer.final_metrics(()) == {"train": None, "val": {"rmse": 1.0, "mae": 0.5}, "test": None}
    assert asked == ["val"]
    assert set(trainer.final_metrics()) == {"train", "val", "test"} and asked[1:] == ["val", "train", "test"]
