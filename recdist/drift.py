"""Drift between two runs' analyst outputs: how tonight's results differ from the previous run's.

`compare(previous, current, ...)` reads two outputs/ folders (metrics.json and the recommendations,
user_factors, item_factors and reliability_deciles tables) and returns metrics.json's `drift` section:

- `metrics`: test RMSE/MAE per stage and NDCG@k per ranking, previous -> current and the change;
- `top10`: overlap@10 of each user's top-10 (users in both runs: shared movies / the longer list), its mean and
  quantiles, and `change` = 1 - mean overlap;
- `top_lists`: movies in some user's top-10 now and in none before (entering), and the reverse (leaving);
- `reliability`: per decile the calibration gap (observed MAE - mean expected_abs_error) before and now, and the
  largest shift;
- `users`, `movies`: new and gone ids (user_factors, item_factors: those with training ratings);
- `warnings`: one line per threshold crossed (DriftConfig.max_top10_change), `exceeded` when any.

Pure data transforms over files: no Ray, no models.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import polars as pl

from recdist import runs, storage, tables

log = logging.getLogger(__name__)

TOP = 10
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SHOWN = 10
"""Movies listed by id in `top_lists` (the most recommended first); the counts cover all of them."""


def outputs_of(run: str) -> str | None:
    """The committed outputs folder of a run directory (or of an outputs folder given itself); None when absent."""
    for where in (storage.join(run, "outputs"), run):
        if storage.exists(storage.join(where, tables.SUCCESS)):
            return where
    return None


def resolve(against: str | None, beside: str) -> str | None:
    """The run to compare with: `auto` = the latest complete run beside `beside` (recdist.runs), else the URI
    given; None when there is none."""
    if not against:
        return None
    if against == "auto":
        return runs.latest_complete(beside)
    return storage.absolute(against)


def compare(previous: str, current: str, *, max_top10_change: float | None = None) -> dict[str, Any]:
    """The drift section comparing two outputs/ folders (see the module's doc)."""
    old, new = (
        storage.read_json(storage.join(previous, "metrics.json")),
        storage.read_json(storage.join(current, "metrics.json")),
    )
    section: dict[str, Any] = {"metrics": metric_changes(old, new)}
    old_recs, new_recs = (tables.read_table(run, "recommendations") for run in (previous, current))
    if old_recs is not None and new_recs is not None:
        section["top10"] = top10_overlap(old_recs, new_recs)
        section["top_lists"] = top_list_changes(old_recs, new_recs)
    old_dec, new_dec = (tables.read_table(run, "reliability_deciles") for run in (previous, current))
    if old_dec is not None and new_dec is not None:
        section["reliability"] = calibration_shift(old_dec, new_dec)
    for key, name, column in (("users", "user_factors", "user_id"), ("movies", "item_factors", "movie_id")):
        before, now = tables.read_table(previous, name, [column]), tables.read_table(current, name, [column])
        if before is not None and now is not None:
            section[key] = id_changes(before[column], now[column])
    section["warnings"] = warnings(section, max_top10_change)
    section["exceeded"] = bool(section["warnings"])
    section["max_top10_change"] = max_top10_change
    return section


def _change(old: float | None, new: float | None) -> dict[str, float | None]:
    ok = isinstance(old, int | float) and isinstance(new, int | float) and not (math.isnan(old) or math.isnan(new))
    return {"previous": old, "current": new, "change": (new - old) if ok else None}  # type: ignore[operator]


def metric_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Test RMSE/MAE per stage and NDCG@k per ranking present in both metrics.json."""
    out: dict[str, Any] = {}
    for stage in ("mf", "reliability", "rating", "single"):
        a, b = old.get(stage, {}).get("test"), new.get(stage, {}).get("test")
        if a and b:
            out[stage] = {key: _change(a.get(key), b.get(key)) for key in ("rmse", "mae")}
    ra, rb = old.get("ranking", {}), new.get("ranking", {})
    k = rb.get("k")
    if k and ra.get("k") == k:
        for name, scores in rb.items():
            if isinstance(scores, dict) and f"ndcg@{k}" in scores and isinstance(ra.get(name), dict):
                out.setdefault(name, {})[f"ndcg@{k}"] = _change(ra[name].get(f"ndcg@{k}"), scores[f"ndcg@{k}"])
    return out


def _tops(recs: pl.DataFrame) -> pl.DataFrame:
    return recs.filter(pl.col("rank") <= TOP).select("user_id", "movie_id")


def top10_overlap(old: pl.DataFrame, new: pl.DataFrame) -> dict[str, Any]:
    """overlap@10 per user in both runs: movies in both top-10s / the longer of the two lists."""
    a, b = _tops(old), _tops(new)
    sizes = a.group_by("user_id").agg(n_old=pl.len()).join(b.group_by("user_id").agg(n_new=pl.len()), on="user_id")
    shared = a.join(b, on=["user_id", "movie_id"]).group_by("user_id").agg(shared=pl.len())
    per_user = sizes.join(shared, on="user_id", how="left").with_columns(
        overlap=pl.col("shared").fill_null(0) / pl.max_horizontal("n_old", "n_new")
    )
    values = per_user["overlap"].to_numpy()
    if values.size == 0:
        return {"users": 0, "mean": None, "change": None, "quantiles": {}}
    mean = float(values.mean())
    return {
        "users": int(values.size),
        "mean": mean,
        "change": 1.0 - mean,
        "quantiles": {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES},
        "unchanged_share": float((values == 1.0).mean()),
    }


def top_list_changes(old: pl.DataFrame, new: pl.DataFrame) -> dict[str, Any]:
    """Movies in some user's top-10 now and in none before (entering) and the reverse (leaving), the most
    recommended first."""
    a = _tops(old).group_by("movie_id").agg(users=pl.len())
    b = _tops(new).group_by("movie_id").agg(users=pl.len())
    entering = b.join(a, on="movie_id", how="anti").sort(["users", "movie_id"], descending=[True, False])
    leaving = a.join(b, on="movie_id", how="anti").sort(["users", "movie_id"], descending=[True, False])
    return {
        "movies_before": a.height,
        "movies_now": b.height,
        "entering": entering.height,
        "leaving": leaving.height,
        "entering_top": entering.head(SHOWN).to_dicts(),
        "leaving_top": leaving.head(SHOWN).to_dicts(),
    }


def calibration_shift(old: pl.DataFrame, new: pl.DataFrame) -> dict[str, Any]:
    """Per reliability decile the calibration gap (observed MAE - mean expected_abs_error) before and now."""
    gap = (pl.col("mae") - pl.col("mean_expected_abs_error")).alias("gap")
    joined = (
        old.select("decile", gap)
        .join(new.select("decile", gap), on="decile", suffix="_now")
        .sort("decile")
        .with_columns(shift=pl.col("gap_now") - pl.col("gap"))
    )
    rows = [
        {"decile": int(r["decile"]), "gap_before": r["gap"], "gap_now": r["gap_now"], "shift": r["shift"]}
        for r in joined.iter_rows(named=True)
    ]
    shifts = [abs(r["shift"]) for r in rows]
    return {
        "deciles": rows,
        "max_abs_shift": max(shifts) if shifts else None,
        "mean_abs_shift": sum(shifts) / len(shifts) if shifts else None,
    }


def id_changes(old: pl.Series, new: pl.Series) -> dict[str, int]:
    before, now = set(old.to_list()), set(new.to_list())
    return {"before": len(before), "now": len(now), "new": len(now - before), "gone": len(before - now)}


def warnings(section: dict[str, Any], max_top10_change: float | None) -> list[str]:
    """One line per threshold the drift crossed."""
    change = section.get("top10", {}).get("change")
    if max_top10_change is None or change is None or change <= max_top10_change:
        return []
    return [
        f"large drift: {change:.1%} of the users' top-10 changed since the previous run "
        f"(mean overlap@10 {1 - change:.3f}), above pipeline.drift.max_top10_change = {max_top10_change:.1%}"
    ]


def attach(outputs: str, metrics: dict[str, Any], run: str, cfg: Any) -> dict[str, Any]:
    """Add the `drift` section to an outputs folder being written (its metrics.json rewritten) when
    `cfg.against` (pipeline.drift) names a run or `auto`; the metrics as they are otherwise."""
    if not cfg.against:
        return metrics
    previous_run = resolve(cfg.against, run)
    previous = outputs_of(previous_run) if previous_run else None
    if previous is None:
        log.info("drift: no previous complete run to compare with (%s)", cfg.against)
        section: dict[str, Any] = {"against": previous_run, "note": "no previous complete run"}
    else:
        section = {"against": previous_run, **compare(previous, outputs, max_top10_change=cfg.max_top10_change)}
        for line in section["warnings"]:
            log.warning("drift: %s", line)
    metrics = {**metrics, "drift": section}
    storage.write_json(storage.join(outputs, "metrics.json"), metrics)
    return metrics


def markdown(section: dict[str, Any]) -> list[str]:
    """The report's short drift table (empty when the run has no drift section)."""
    if not section:
        return []
    lines = ["## Drift since the previous run", ""]
    if "note" in section:
        return lines + [f"No comparison: {section['note']}.", ""]
    lines += [f"Against `{section['against']}`.", "", *_verdict(section), "", "| what | previous | current | change |"]
    lines.append("|---|---|---|---|")
    for stage, figures in section.get("metrics", {}).items():
        for key, c in figures.items():
            lines.append(f"| {stage} {key} | {_fmt(c['previous'])} | {_fmt(c['current'])} | {_fmt(c['change'], '+')} |")
    top = section.get("top10")
    if top and top.get("users"):
        q = top["quantiles"]
        lines.append(
            f"| overlap@10 (mean; p10 / p50 / p90 over {top['users']:,} users) | | {top['mean']:.3f}; "
            f"{q['p10']:.2f} / {q['p50']:.2f} / {q['p90']:.2f} | {top['change']:.1%} changed |"
        )
    lists = section.get("top_lists")
    if lists:
        lines.append(
            f"| movies in the top-10 lists | {lists['movies_before']:,} | {lists['movies_now']:,} | "
            f"+{lists['entering']:,} entering, -{lists['leaving']:,} leaving |"
        )
    rel = section.get("reliability")
    if rel and rel.get("max_abs_shift") is not None:
        lines.append(f"| reliability calibration gap, largest shift of a decile | | | {rel['max_abs_shift']:+.4f} |")
    for key in ("users", "movies"):
        if key in section:
            c = section[key]
            lines.append(
                f"| {key} with training ratings | {c['before']:,} | {c['now']:,} | "
                f"+{c['new']:,} new, -{c['gone']:,} gone |"
            )
    return lines + [""]


def _verdict(section: dict[str, Any]) -> list[str]:
    """The drift judged: each threshold crossed, or how far below it the run stayed."""
    if section.get("warnings"):
        return [f"**Warning: {w}.**" for w in section["warnings"]]
    change, limit = section.get("top10", {}).get("change"), section.get("max_top10_change")
    if change is None:
        return ["No top-10 lists to compare."]
    if limit is None:
        return [f"{change:.1%} of the users' top-10 changed (no threshold set: pipeline.drift.max_top10_change)."]
    return [f"**Within the threshold**: {change:.1%} of the users' top-10 changed; a warning above {limit:.0%} "
            "(pipeline.drift.max_top10_change)."]  # fmt: skip


def _fmt(value: Any, sign: str = "") -> str:
    return "" if value is None else f"{value:{sign}.4f}"
