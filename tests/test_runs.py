"""Nightly runs (recdist.runs, recdist.drift): which runs are complete and the latest, retention, and drift
between two runs' outputs, checked by hand on two hand-made outputs folders (no Ray), locally and on S3."""

from __future__ import annotations

import json
import os
import socket
import time

import pyarrow as pa
import pytest

from recdist import runlock, runs, storage, tables
from recdist.config import DriftConfig
from recdist.drift import attach, compare, markdown
from recdist.report import render

STAMP = tables.Stamp("9.9.9", "20261201T000000Z-abcdef", "0123456789abcdef")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def parent(request, tmp_path) -> str:
    """An empty parent of runs: a local directory, or a prefix in a fresh bucket on the S3 test server."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_bucket") + "/runs"


def make_run(parent: str, name: str, *, complete: bool = True, created_at: str | None = None) -> str:
    run = storage.join(parent, name)
    storage.write_json(storage.join(run, storage.MANIFEST), {"created_at": created_at or "2026-01-01T00:00:00+00:00"})
    storage.write_json(storage.join(run, "outputs", "metrics.json"), {})
    if complete:
        storage.write_bytes(storage.join(run, "outputs", tables.SUCCESS), b"")
    return run


def names(uris: list[str]) -> list[str]:
    return [u.rstrip("/").rsplit("/", 1)[-1] for u in uris]


# --- complete runs, the latest ------------------------------------------------------------------------------------


def test_latest_complete_is_the_newest_complete_run_beside_and_ignores_an_incomplete_one(parent):
    for day in ("2026-01-01", "2026-01-03"):
        make_run(parent, f"date={day}")
    make_run(parent, "date=2026-01-02")
    make_run(parent, "date=2026-01-04", complete=False)  # in progress or failed: outputs without _SUCCESS
    tonight = storage.join(parent, "date=2026-01-05")
    assert names([r.uri for r in runs.complete_runs(parent)]) == [f"date=2026-01-0{d}" for d in (1, 2, 3)]
    assert names([runs.latest_complete(tonight)]) == ["date=2026-01-03"]
    assert names([runs.latest_complete(storage.join(parent, "date=2026-01-03"))]) == ["date=2026-01-02"]  # not itself
    assert names([runs.latest_complete(storage.join(parent, "date=2026-01-02"))]) == ["date=2026-01-01"]  # a backfill
    assert runs.latest_complete(storage.join(parent, "date=2026-01-01")) is None


def test_undated_runs_are_ordered_by_their_manifest_created_at(tmp_path):
    parent = str(tmp_path)
    make_run(parent, "b", created_at="2026-01-02T00:00:00+00:00")
    make_run(parent, "a", created_at="2026-01-03T00:00:00+00:00")
    make_run(parent, "c", created_at="2026-01-01T00:00:00+00:00")
    assert names([r.uri for r in runs.complete_runs(parent)]) == ["c", "b", "a"]
    assert names([runs.latest_complete(str(tmp_path / "tonight"))]) == ["a"]
    assert runs.latest_complete(str(tmp_path / "nowhere" / "run")) is None


# --- retention ------------------------------------------------------------------------------------------------------


def hold_lock(run: str) -> None:
    """A live run's lock: this process locally, an unexpired lease on S3."""
    if storage.is_s3(run):
        storage.write_json(
            storage.join(run, runlock.LOCK), {"pid": 1, "host": "elsewhere", "expires_at": time.time() + 600}
        )
    else:
        storage.write_json(storage.join(run, runlock.LOCK), {"pid": os.getpid(), "host": socket.gethostname()})


def test_retention_keeps_the_last_n_and_never_a_protected_incomplete_or_locked_run(parent):
    make_run(parent, "date=2025-12-31", complete=False)  # older than all, incomplete: never deleted
    for day in range(1, 7):
        make_run(parent, f"date=2026-01-0{day}")
    hold_lock(storage.join(parent, "date=2026-01-03"))
    warm_source = storage.join(parent, "date=2026-01-01")
    deleted = runs.keep_last(parent, 2, protect=[warm_source])
    assert names(deleted) == ["date=2026-01-02", "date=2026-01-04"]
    assert storage.listdir(parent) == [
        "date=2025-12-31",
        "date=2026-01-01",
        "date=2026-01-03",
        "date=2026-01-05",
        "date=2026-01-06",
    ]
    assert runs.keep_last(parent, 2, protect=[warm_source]) == []  # nothing more to delete
    with pytest.raises(ValueError):
        runs.keep_last(parent, 0)


def test_a_dead_holders_lock_does_not_keep_a_run(tmp_path):
    parent = str(tmp_path)
    for day in (1, 2):
        make_run(parent, f"date=2026-01-0{day}")
    storage.write_json(
        str(tmp_path / "date=2026-01-01" / runlock.LOCK), {"pid": 2**22 + 7, "host": socket.gethostname()}
    )
    assert runlock.live_holder(str(tmp_path / "date=2026-01-01")) is None
    assert names(runs.keep_last(parent, 1)) == ["date=2026-01-01"]


def test_after_run_applies_retention_protecting_the_warm_start_and_drift_sources(tmp_path):
    parent = str(tmp_path)
    for day in range(1, 5):
        make_run(parent, f"date=2026-01-0{day}")
    tonight = str(tmp_path / "date=2026-01-04")
    storage.write_json(
        storage.join(tonight, storage.MANIFEST), {"warm_start": {"source": str(tmp_path / "date=2026-01-01")}}
    )
    drift = {"against": str(tmp_path / "date=2026-01-02"), "exceeded": True}
    storage.write_json(storage.join(tonight, "outputs", "metrics.json"), {"drift": drift})
    assert runs.after_run(tonight, 1) == 0
    assert storage.listdir(parent) == ["date=2026-01-01", "date=2026-01-02", "date=2026-01-04"]
    assert runs.after_run(tonight, None, fail_on_drift=True) == runs.DRIFT_EXIT  # asked to fail on a large drift


# --- drift, by hand -------------------------------------------------------------------------------------------------

PREVIOUS_METRICS = {
    "mf": {"test": {"rmse": 0.90, "mae": 0.70, "n": 100}},
    "rating": {"test": {"rmse": 0.85, "mae": 0.66, "n": 100}},
    "ranking": {"k": 10, "popularity": {"ndcg@10": 0.05}, "mf": {"ndcg@10": 0.10}, "rating": {"ndcg@10": 0.20}},
}
CURRENT_METRICS = {
    "mf": {"test": {"rmse": 0.88, "mae": 0.69, "n": 110}},
    "rating": {"test": {"rmse": 0.86, "mae": 0.66, "n": 110}},
    "ranking": {"k": 10, "popularity": {"ndcg@10": 0.05}, "mf": {"ndcg@10": 0.12}, "rating": {"ndcg@10": 0.15}},
}
PREVIOUS_TOPS = {1: range(1, 11), 2: range(1, 11), 3: range(11, 21), 5: range(1, 6)}
CURRENT_TOPS = {1: [*range(1, 11), 99], 2: range(6, 16), 4: range(21, 26), 5: [1, 2, 3, 30]}
"""User 1's 11th movie (99) is outside the top-10. Users in both: 1 (overlap 10/10), 2 (5/10), 5 (3 of the longer
list's 5 = 0.6); user 3 is gone, user 4 new."""


def recommendations(tops: dict[int, list[int]]) -> pa.Table:
    rows = [(u, r + 1, m) for u, movies in tops.items() for r, m in enumerate(movies)]
    return pa.table({
        "user_id": [u for u, _, _ in rows], "rank": [r for _, r, _ in rows], "movie_id": [m for _, _, m in rows],
        "title": [f"m{m}" for _, _, m in rows], "score": [4.0] * len(rows), "expected_abs_error": [0.5] * len(rows),
        "rank_score": [1.0] * len(rows), "candidate_score": [1.0] * len(rows),
    })  # fmt: skip


def factors(ids: list[int], key: str) -> pa.Table:
    n = len(ids)
    cols = {key: ids, "n_train": [3] * n, "bias": [0.1] * n, "factors": [[0.5, 0.5]] * n}
    if key == "movie_id":
        cols |= {"title": [f"m{i}" for i in ids], "genres": ["Drama"] * n, "pc1": [0.0] * n, "pc2": [0.0] * n}
    return pa.table(cols)


def deciles(rows: list[tuple[int, float, float]]) -> pa.Table:
    """(decile, mean_expected_abs_error, mae) rows."""
    n = len(rows)
    return pa.table({
        "decile": [d for d, _, _ in rows], "n": [10] * n, "expected_abs_error_min": [e for _, e, _ in rows],
        "expected_abs_error_max": [e for _, e, _ in rows], "mean_expected_abs_error": [e for _, e, _ in rows],
        "mae": [m for _, _, m in rows], "mf_mae": [None] * n, "rmse": [m for _, _, m in rows], "mf_rmse": [None] * n,
    })  # fmt: skip


def write_outputs(outputs: str, metrics, tops, users, movies, decile_rows) -> str:
    storage.write_json(storage.join(outputs, "metrics.json"), metrics)
    tables.write_table(recommendations(tops), outputs, "recommendations", STAMP)
    tables.write_table(factors(users, "user_id"), outputs, "user_factors", STAMP)
    tables.write_table(factors(movies, "movie_id"), outputs, "item_factors", STAMP)
    tables.write_table(deciles(decile_rows), outputs, "reliability_deciles", STAMP)
    storage.write_bytes(storage.join(outputs, tables.SUCCESS), b"")
    return outputs


def two_runs(parent: str) -> tuple[str, str]:
    previous = write_outputs(
        storage.join(parent, "date=2026-01-01", "outputs"),
        PREVIOUS_METRICS,
        PREVIOUS_TOPS,
        [1, 2, 3, 5],
        list(range(1, 21)),
        [(1, 0.4, 0.5), (2, 1.0, 0.9)],
    )
    current = write_outputs(
        storage.join(parent, "date=2026-01-02", "outputs"),
        CURRENT_METRICS,
        CURRENT_TOPS,
        [1, 2, 4, 5, 6],
        [*range(1, 16), *range(21, 26), 30],
        [(1, 0.4, 0.6), (2, 0.95, 0.9)],
    )
    return previous, current


def test_drift_figures_by_hand(parent):
    previous, current = two_runs(parent)
    d = compare(previous, current, max_top10_change=0.5)
    m = d["metrics"]
    assert m["mf"]["rmse"]["change"] == pytest.approx(-0.02) and m["rating"]["rmse"]["change"] == pytest.approx(0.01)
    assert m["mf"]["mae"]["change"] == pytest.approx(-0.01) and m["rating"]["mae"]["change"] == pytest.approx(0.0)
    assert m["rating"]["ndcg@10"]["change"] == pytest.approx(-0.05) and m["mf"]["ndcg@10"]["previous"] == 0.10
    assert m["popularity"]["ndcg@10"]["change"] == pytest.approx(0.0)

    top = d["top10"]
    assert top["users"] == 3 and top["mean"] == pytest.approx(0.7) and top["change"] == pytest.approx(0.3)
    # [0.5, 0.6, 1.0] at positions 0.2, 1.0, 1.8 (linear interpolation)
    assert top["quantiles"]["p10"] == pytest.approx(0.52)
    assert top["quantiles"]["p50"] == pytest.approx(0.6)
    assert top["quantiles"]["p90"] == pytest.approx(0.92)
    assert top["unchanged_share"] == pytest.approx(1 / 3)

    lists = d["top_lists"]  # before: 1..20; now: 1..15, 21..25, 30 (99 is rank 11)
    assert (lists["movies_before"], lists["movies_now"], lists["entering"], lists["leaving"]) == (20, 21, 6, 5)
    assert [r["movie_id"] for r in lists["entering_top"]] == [21, 22, 23, 24, 25, 30]
    assert [r["movie_id"] for r in lists["leaving_top"]] == [16, 17, 18, 19, 20]

    rel = d["reliability"]  # gap = mae - mean expected error: decile 1 0.1 -> 0.2, decile 2 -0.1 -> -0.05
    assert [r["shift"] for r in rel["deciles"]] == [pytest.approx(0.1), pytest.approx(0.05)]
    assert rel["max_abs_shift"] == pytest.approx(0.1) and rel["mean_abs_shift"] == pytest.approx(0.075)

    assert d["users"] == {"before": 4, "now": 5, "new": 2, "gone": 1}
    assert d["movies"] == {"before": 20, "now": 21, "new": 6, "gone": 5}
    assert d["warnings"] == [] and d["exceeded"] is False


def test_a_large_drift_is_a_warning_line_in_metrics_and_the_report(parent):
    previous, current = two_runs(parent)
    metrics = storage.read_json(storage.join(current, "metrics.json"))
    tonight = storage.join(parent, "date=2026-01-02")
    cfg = DriftConfig(against="auto", max_top10_change=0.25)
    out = attach(current, metrics, tonight, cfg)
    assert storage.read_json(storage.join(current, "metrics.json")) == json.loads(json.dumps(out))
    d = out["drift"]
    assert runs.same(d["against"], storage.join(parent, "date=2026-01-01"))
    assert d["exceeded"] and "30.0% of the users' top-10 changed" in d["warnings"][0]
    text = "\n".join(markdown(d))
    assert "## Drift since the previous run" in text and "**Warning: large drift" in text
    assert "| users with training ratings | 4 | 5 | +2 new, -1 gone |" in text
    assert "| rating rmse | 0.8500 | 0.8600 | +0.0100 |" in text
    assert runs.after_run(tonight, None, fail_on_drift=True) == runs.DRIFT_EXIT
    calm = attach(current, metrics, tonight, DriftConfig(against="auto", max_top10_change=0.5))["drift"]
    assert not calm["exceeded"] and calm["max_top10_change"] == 0.5
    text = "\n".join(markdown(calm))  # the report judges a calm night too: how far below the threshold
    assert "**Within the threshold**: 30.0% of the users' top-10 changed; a warning above 50%" in text
    assert "\n\n\n" not in text


def test_no_previous_run_is_a_note_and_unset_is_no_section(tmp_path):
    _, current = two_runs(str(tmp_path / "a"))
    metrics = storage.read_json(storage.join(current, "metrics.json"))
    assert attach(current, metrics, str(tmp_path / "a" / "date=2026-01-02"), DriftConfig()) == metrics
    alone = str(tmp_path / "b" / "date=2026-01-02")
    out = attach(current, metrics, alone, DriftConfig(against="auto"))
    assert out["drift"] == {"against": None, "note": "no previous complete run"}
    assert "No comparison: no previous complete run." in "\n".join(markdown(out["drift"]))


def test_the_report_shows_the_drift_table():
    from recdist.config import Config

    drift = {"against": "runs/date=2026-01-01", "metrics": {}, "warnings": [], "users": {"before": 1, "now": 2,
             "new": 1, "gone": 0}}  # fmt: skip
    text = render({"drift": drift}, {}, None, Config())
    assert "## Drift since the previous run" in text and "+1 new, -0 gone" in text
