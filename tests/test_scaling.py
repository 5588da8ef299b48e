"""bench/scaling.py's cost model: its byte counts are what the real solvers pass to the collective (counted by
wrapping it), and its epoch times behave as a cost model must (limits, monotonicity, the crossover)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace

import pytest
import torch
from helpers import ROOT

from recdist.train import dist

_spec = importlib.util.spec_from_file_location("scaling", ROOT / "bench" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
sys.modules["scaling"] = scaling  # dataclasses look their module up
_spec.loader.exec_module(scaling)

USERS, ITEMS, RATINGS = 300, 120, 6000
RATES = scaling.Rates(
    sgd_rows={16: 20e6, 32: 15e6, 64: 9e6},
    als_gram={16: 10e6, 32: 3e6, 64: 0.8e6},
    als_solve={16: 400e3, 32: 120e3, 64: 30e3},
)


def _inputs(**kw) -> scaling.Inputs:
    return scaling.Inputs(**{"shape": scaling.ML20M, "rank": 16, "workers": 1, "rates": RATES, **kw})


def _solver(name: str, rank: int, biased: bool, data=None):
    """The real solver as training builds it, on (this rank's share of) the sample ratings."""
    from recdist.config import StageConfig, TrainConfig
    from recdist.train.run import build_model
    from recdist.train.solvers import Problem, make_solver

    data = data or scaling.sample_data(USERS, ITEMS, RATINGS, seed=3)
    model = "biased_mf" if biased else "mf"
    stage = StageConfig(model=model, params={"rank": rank}, train=TrainConfig(solver=name, lr=0.01))
    return make_solver(Problem(build_model(stage, data.dims), stage.train, data))


@pytest.mark.parametrize("workers", [2, 3, 4])
@pytest.mark.parametrize("biased", [True, False])
def test_byte_counts_are_what_the_solvers_all_reduce(monkeypatch, workers: int, biased: bool) -> None:
    """Rank 0 of a faked world: every all-reduce an epoch makes, counted at recdist.train.dist (identity sums,
    identity all-to-all), in order and size, equals the model's list."""
    sizes: list[int] = []

    def count(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(dist, "world_size", lambda: workers)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "all_reduce_sum_", count)
    monkeypatch.setattr(dist, "all_to_all_", lambda out, x, *_: out.copy_(x))
    for name in ("sgd", "als"):
        solver = _solver(name, rank=5, biased=biased)
        sizes.clear()
        solver.train_epoch(0)
        if name == "sgd":
            x = _inputs(workers=workers, threads=solver.threads)
            assert solver.strata == scaling.strata(x)
            want = scaling.dsgd_collectives(USERS, ITEMS, 5, biased, workers, solver.strata)
        else:
            want = scaling.als_collectives(USERS, ITEMS, 5, biased, workers)
        assert sizes == want, name


def _gloo_rank(rank: int, world: int, init: str, out: str) -> None:
    """One real gloo rank: torch.distributed.all_reduce wrapped to count the bytes each solver's epoch passes."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    real, sizes = tdist.all_reduce, []

    def counted(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    tdist.all_reduce = counted
    result = {}
    for name in ("sgd", "als"):
        solver = _solver(name, 5, True, scaling.sample_data(USERS, ITEMS, RATINGS, seed=3, rank=rank, world=world))
        sizes.clear()
        solver.train_epoch(0)
        result[name] = {"sizes": list(sizes), "strata": getattr(solver, "strata", None)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    tdist.destroy_process_group()


@pytest.mark.slow
def test_byte_counts_on_two_real_gloo_ranks(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_gloo_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    for r in range(2):
        got = json.loads(open(f"{out}.{r}").read())
        assert got["sgd"]["sizes"] == scaling.dsgd_collectives(USERS, ITEMS, 5, True, 2, got["sgd"]["strata"])
        assert got["als"]["sizes"] == scaling.als_collectives(USERS, ITEMS, 5, True, 2)


def test_one_worker_moves_nothing_and_more_workers_compute_less() -> None:
    for fn in (scaling.dsgd_epoch, scaling.als_epoch):
        one = fn(_inputs())
        assert one.comm == 0 and one.payload == 0 and one.collectives == 0
        computes = [fn(_inputs(workers=w)).compute for w in (1, 2, 4, 16, 64)]
        assert computes == sorted(computes, reverse=True)
    dsgd = [scaling.dsgd_epoch(_inputs(workers=w)).compute for w in (1, 4, 16)]
    assert dsgd[0] == pytest.approx(4 * dsgd[1]) and dsgd[1] == pytest.approx(4 * dsgd[2])  # linear in workers


def test_als_payload_is_flat_in_workers_and_dsgd_grows_with_strata() -> None:
    als = {scaling.als_epoch(_inputs(workers=w)).payload for w in (2, 4, 64, 1000)}
    assert len(als) == 1
    d = 17  # rank 16 + bias
    s = scaling.ML20M
    assert als == {(s.n_users + s.n_items) * (d * (d + 1) // 2 + d) * 4 + 16}
    dsgd = [scaling.dsgd_epoch(_inputs(workers=w, threads=2)).payload for w in (2, 4, 8, 16)]
    assert dsgd[0] == dsgd[1]  # S = 8 up to 4 workers of 2 threads
    assert dsgd[1] < dsgd[2] < dsgd[3]  # then S = 2 W: one item all-reduce per stratum


def test_network_limits() -> None:
    fast = dict(bandwidth=float("inf"), latency=0.0)
    for fn in (scaling.dsgd_epoch, scaling.als_epoch):
        e = fn(_inputs(workers=16, **fast))
        assert e.comm == 0 and e.seconds == e.compute
        times = [fn(_inputs(workers=16, bandwidth=g * scaling.GBIT)).seconds for g in (1, 10, 25, 100)]
        assert times == sorted(times, reverse=True)
        lat = [fn(_inputs(workers=16, latency=a)).seconds for a in (0, 1e-5, 1e-4)]
        assert lat == sorted(lat)
    # a ring all-reduce puts 2(W-1)/W of the bytes on each link: 1x at 2 ranks, towards 2x with many
    assert scaling.allreduce_seconds(1e9, 2, 1e9, 0.0) == pytest.approx(1.0)
    assert scaling.allreduce_seconds(1e9, 10_000, 1e9, 0.0) == pytest.approx(2.0, rel=1e-3)
    assert scaling.allreduce_seconds(1e9, 1, 1e9, 1.0) == 0.0


def test_als_never_beats_its_solve_floor_and_oversubscribed_cores_slow_compute() -> None:
    x = _inputs(workers=10**6, bandwidth=float("inf"), latency=0.0)
    floor = (x.shape.n_users + x.shape.n_items) / (x.threads * RATES.als_solve[16])
    assert scaling.als_epoch(x).seconds >= floor
    assert scaling.als_epoch(x).seconds == pytest.approx(floor, rel=1e-3)  # every rank solves every row
    own = scaling.dsgd_epoch(_inputs(workers=4, threads=1))
    shared = scaling.dsgd_epoch(_inputs(workers=4, threads=1, cores=2))
    assert shared.compute == pytest.approx(2 * own.compute) and shared.comm == own.comm


def test_crossover_is_where_the_order_flips() -> None:
    x = _inputs(rank=16, bandwidth=10 * scaling.GBIT)
    als_from, back = scaling.crossover(x, max_workers=512)
    assert als_from is not None  # with these rates DSGD's growing item all-reduces lose to ALS's flat payload

    def faster(w):
        return scaling.als_epoch(replace(x, workers=w)).seconds < scaling.dsgd_epoch(replace(x, workers=w)).seconds

    assert faster(als_from) and not any(faster(w) for w in range(1, als_from))
    if back is not None:
        assert not faster(back)
    slow_als = replace(x, rates=replace(RATES, als_solve={16: 1.0}))
    assert scaling.crossover(slow_als, max_workers=64) == (None, None)
    w, secs = scaling.best_workers(scaling.dsgd_epoch, x, max_workers=256)
    assert secs == min(scaling.dsgd_epoch(replace(x, workers=v)).seconds for v in range(1, 257))
