"""The run report (outputs/report.md) a person reads first: accuracy per stage, reliability by decile, ranking
metrics, the movie map, learning curves, and where the tables are.

Built from metrics.json and the analyst tables already written in the outputs directory; figures are PNGs
in outputs/figures/ (matplotlib's object API with the Agg canvas: no global pyplot state).
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from recdist import storage, tables
from recdist.config import Config
from recdist.drift import markdown as drift_markdown
from recdist.figures import png_bytes

REPORT = "report.md"
FIGURES = {
    "reliability": f"{tables.FIGURES}/reliability_deciles.png",
    "map": f"{tables.FIGURES}/movie_map.png",
    "curves": f"{tables.FIGURES}/learning_curves.png",
}
"""The report's figures, relative to the outputs directory (the report links them so)."""


def write_report(
    out: str, metrics: dict[str, Any], models: Any, config: Config, stamp: tables.Stamp | None = None
) -> str:
    """Write the figures and report.md into `out`; return the report's file name."""
    figures = {}
    if metrics.get("reliability_deciles"):
        storage.write_bytes(storage.join(out, FIGURES["reliability"]), reliability_png(metrics["reliability_deciles"]))
        figures["reliability"] = FIGURES["reliability"]
    factors_uri = tables.table_dir(out, "item_factors")
    factors = pl.from_arrow(storage.read_parquet(factors_uri)) if storage.exists(factors_uri) else None
    if factors is not None and factors.height >= 2:
        storage.write_bytes(
            storage.join(out, FIGURES["map"]), movie_map_png(factors, config.pipeline.outputs.map_items)
        )
        figures["map"] = FIGURES["map"]
    histories = _histories(models.histories)
    if histories:
        storage.write_bytes(storage.join(out, FIGURES["curves"]), learning_curves_png(histories))
        figures["curves"] = FIGURES["curves"]
    text = render(metrics, figures, factors, config, run_info(models.data, config, stamp))
    storage.write_bytes(storage.join(out, REPORT), text.encode())
    return REPORT


def run_info(data: str, config: Config, stamp: tables.Stamp | None = None) -> dict[str, str]:
    """The report's run metadata: date (UTC, now), data (the prepared dataset's name, size and location),
    config_hash (RUN/manifest.json's) and recdist version; with the run's stamp, its run id and git commit."""
    from datetime import datetime, timezone

    from recdist import __version__
    from recdist.data.dataset import read_manifest

    m = read_manifest(data)
    size = f"{m['n_ratings']:,} ratings, {m['n_users']:,} users, {m['n_items']:,} movies"
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": f"{m.get('name') or 'ratings'} ({size}; split {m.get('split_method', '?')}) at {data}",
        "config_hash": config.digest(),
        "version": __version__,
    }
    if stamp is not None:
        info.update(run_id=stamp.run_id, git_commit=stamp.git_commit or "unknown")
    return info


def render(
    metrics: dict[str, Any],
    figures: dict[str, str],
    factors: pl.DataFrame | None,
    config: Config,
    info: dict[str, str] | None = None,
) -> str:
    """The Markdown text of the report: verdicts first, then the figures behind them."""
    p = config.pipeline
    if p.kind == "rncf":
        errors = f"{p.crossfit.folds}-fold cross-fitted" if p.crossfit.folds >= 2 else "in-sample (as the paper)"
        header = f"Pipeline: three-stage RNCF (MF -> reliability -> rating); stage-1 errors of training rows {errors}."
    else:
        header = f"Pipeline: the single model `{config.stages.single.model}`."
    lines = ["# recdist run report", "", *_metadata(info), header, ""]
    lines += verdicts(metrics)
    lines += _cold_line(metrics.get("cold", {}))
    lines += _start_section(metrics)
    lines += _accuracy_section(metrics)
    lines += drift_markdown(metrics.get("drift", {}))
    lines += _reliability_section(metrics, figures)
    lines += _ranking_section(metrics.get("ranking", {}))
    lines += _movies_section(factors, figures, p.outputs.similar_min_ratings)
    lines += _curves_section(figures)
    lines += _tables_section(p.outputs)
    return "\n".join(lines)


def _metadata(info: dict[str, str] | None) -> list[str]:
    if not info:
        return []
    return [
        "| run | |",
        "|---|---|",
        f"| date (UTC) | {info.get('date', '')} |",
        f"| data | {info.get('data', '')} |",
        f"| config hash | `{info.get('config_hash', '')}` (RUN/manifest.json, RUN/config.yaml) |",
        f"| recdist | {info.get('version', '')} |",
        *(f"| {label} | `{info[key]}` |" for key, label in (("run_id", "run id"), ("git_commit", "git commit"))
          if key in info),
        "",
    ]


SAME = 0.001
"""A relative difference below this (0.1%) is reported as no different."""
RELIABILITY_LEVELS = ((1.5, 0.9, "strong"), (1.2, 0.7, "moderate"))
"""(least / most reliable decile's test RMSE at least, Spearman of decile vs its RMSE at least, verdict), the
first that holds; else `weak`: strong means the least reliable tenth errs half as much again as the most reliable
and the deciles between rise in order."""


def verdicts(metrics: dict[str, Any]) -> list[str]:
    """One judged line per question a reader asks first: did stage 3 help on RMSE and on ranking, does the
    reliability mean something, does the final model beat the baselines and popularity."""
    lines = [*_refit_verdicts(metrics.get("start", {}))]
    lines += [*_stage_verdicts(metrics), *_baseline_verdict(metrics), *_reliability_verdict(metrics)]
    lines += _popularity_verdict(metrics.get("ranking", {}), _final(metrics))
    return ["## Verdict", "", *(f"- {line}" for line in lines), ""] if lines else []


def _final(metrics: dict[str, Any]) -> str:
    return "rating" if "rating" in metrics else "single"


def _compare(new: float, old: float, lower_is_better: bool) -> tuple[str, str]:
    """'better than' / 'worse than' / 'no different from', and the change: relative (+25.00%), or as a factor
    (22.4x) where one is at least twice the other, which a percentage makes hard to read (+2140%)."""
    rel = (new - old) / old if old else float("nan")
    if not math.isfinite(rel) or abs(rel) < SAME:
        word = "no different from"
    else:
        word = "better than" if (rel < 0) == lower_is_better else "worse than"
    if not math.isfinite(rel):
        return word, "n/a"
    return word, (f"{new / old:.1f}x" if new / old >= 2 or new / old <= 0.5 else f"{rel:+.2%}")


def _stage_verdicts(metrics: dict[str, Any]) -> list[str]:
    lines = []
    rmse = {s: metrics.get(s, {}).get("test", {}).get("rmse") for s in ("mf", "rating")}
    if None not in rmse.values():
        word, rel = _compare(rmse["rating"], rmse["mf"], lower_is_better=True)
        lines.append(
            f"**Stage 3 is {word} stage 1 on test RMSE**: {rmse['rating']:.4f} vs {rmse['mf']:.4f} ({rel})."
        )
    ranking = metrics.get("ranking", {})
    key = f"ndcg@{ranking.get('k', 10)}"
    ndcg = {s: ranking.get(s, {}).get(key) for s in ("mf", "rating")}
    if None not in ndcg.values():
        word, rel = _compare(ndcg["rating"], ndcg["mf"], lower_is_better=False)
        lines.append(
            f"**The final ranking is {word} stage 1 MF's on {key.upper()}**: {ndcg['rating']:.4f} vs "
            f"{ndcg['mf']:.4f} ({rel})."
        )
    return lines


def _baseline_verdict(metrics: dict[str, Any]) -> list[str]:
    final = metrics.get(_final(metrics), {}).get("test", {}).get("rmse")
    base = metrics.get("baselines", {})
    if final is None:
        return []
    if "item_mean" not in base:
        return ["Baselines: not computed for this run (metrics.json has no `baselines`; runs before they were)."]
    word, rel = _compare(final, base["item_mean"]["rmse"], lower_is_better=True)
    line = (
        f"**The final model is {word} the movie-mean baseline on test RMSE**: {final:.4f} vs "
        f"{base['item_mean']['rmse']:.4f} ({rel})"
    )
    if "global_mean" in base:
        line += f"; the global mean scores {base['global_mean']['rmse']:.4f}"
    return [line + "."]


def _reliability_verdict(metrics: dict[str, Any]) -> list[str]:
    deciles = metrics.get("reliability_deciles") or []
    if len(deciles) < 2 or not deciles[0].get("rmse"):
        return []
    first, last = deciles[0]["rmse"], deciles[-1]["rmse"]
    ratio, order = last / first, decile_order(deciles)
    level = next((name for r, rho, name in RELIABILITY_LEVELS if ratio >= r and order >= rho), "weak")
    per_rating = metrics.get("reliability_summary", {}).get("spearman_pred_vs_observed_sq_error")
    tail = f"; {per_rating:.3f} rating by rating, where noise dominates" if per_rating is not None else ""
    return [
        f"**Reliability is {level}**: the least reliable decile's test RMSE is {ratio:.2f}x the most reliable's "
        f"({last:.3f} vs {first:.3f}); Spearman of decile vs its RMSE {order:.2f}{tail}."
    ]


def decile_order(deciles: list[dict[str, Any]]) -> float:
    """Spearman rank correlation of decile number and the decile's observed RMSE (1: error rises in order)."""
    frame = pl.DataFrame({"d": [float(d["decile"]) for d in deciles], "r": [float(d["rmse"]) for d in deciles]})
    value = frame.select(pl.corr("d", "r", method="spearman")).item()
    return float("nan") if value is None else float(value)


def _popularity_verdict(ranking: dict[str, Any], final: str) -> list[str]:
    key = f"ndcg@{ranking.get('k', 10)}"
    model, base = ranking.get(final, {}).get(key), ranking.get("popularity", {}).get(key)
    if model is None or not base:
        return []
    times = ranking.get("vs_popularity", {}).get(final, model / base)
    word = "beats" if times >= 1 + SAME else ("falls below" if times <= 1 - SAME else "ties with")
    return [
        f"**The final ranking {word} the popularity baseline**: {key.upper()} {model:.4f} vs {base:.4f} "
        f"({times:.2f}x)."
    ]


def _cold_line(cold: dict[str, Any]) -> list[str]:
    if not cold:
        return []
    counts = ", ".join(f"{cold[k]['rows']:,} {k}" for k in ("train", "val", "test") if k in cold)
    test = cold.get("test", {"rows": 0, "cold": 0})
    return [
        f"Ratings: {counts}. {test['cold']:,} test ratings are cold (their user or movie has no training "
        "rating): they get the fallback, global mean plus the known side's bias, and count in every figure.",
        "",
    ]


STAGE_NAMES = {"mf": "1 mf", "reliability": "2 reliability (target: squared error)", "rating": "3 rating"}
BASELINE_NAMES = {"global_mean": "baseline: global training mean", "item_mean": "baseline: movie's training mean"}


def _accuracy_section(metrics: dict[str, Any]) -> list[str]:
    lines = [
        "## Accuracy (RMSE / MAE per split)",
        "",
        "| model | train RMSE | val RMSE | test RMSE | test MAE | test rows |",
        "|---|---|---|---|---|---|",
    ]
    for stage in ("mf", "reliability", "rating", "single"):
        if stage in metrics:
            row = metrics[stage]
            lines.append(
                f"| {STAGE_NAMES.get(stage, stage)} | {_f(row, 'train', 'rmse')} | {_f(row, 'val', 'rmse')} "
                f"| {_f(row, 'test', 'rmse')} | {_f(row, 'test', 'mae')} | {row.get('test', {}).get('n', '')} |"
            )
    for name, row in metrics.get("baselines", {}).items():
        lines.append(
            f"| {BASELINE_NAMES.get(name, name)} | | | {_f({'test': row}, 'test', 'rmse')} "
            f"| {_f({'test': row}, 'test', 'mae')} | {row.get('n', '')} |"
        )
    if "mf" in metrics and "rating" in metrics:
        a, b = metrics["mf"]["test"]["rmse"], metrics["rating"]["test"]["rmse"]
        lines += ["", f"Stage 3 changes test RMSE from {a:.4f} (stage 1) to {b:.4f} ({(b - a) / a:+.2%})."]
    if "baselines" in metrics:
        lines += ["", "The baselines predict every test rating by the mean of the training ratings (of all, or of "
                  "the movie's; the global mean for a movie without any): a model should beat both."]
    if "reliability" in metrics:
        lines += [
            "",
            "Stage 2's row is in squared-rating units: how far its predicted squared errors are from the observed "
            "ones. Train figures are on ratings the stages were fitted to (in-sample); compare models on test.",
        ]
    return lines


def _curves_section(figures: dict[str, str]) -> list[str]:
    if "curves" not in figures:
        return []
    return [
        "",
        "## Learning curves",
        "",
        f"![learning curves]({figures['curves']})",
        "",
        "Per stage: training MSE (left axis, running over each epoch's steps) and validation RMSE (right "
        "axis) by epoch; stage 2's are in squared-rating units, as it predicts squared errors. The model "
        "kept is the epoch with the lowest validation RMSE.",
    ]


def _tables_section(shown: Any) -> list[str]:
    from recdist.schema import OUTPUT_TABLES

    rows = [
        f"| {t.name}/ | {t.row}{f' (only {t.only})' if t.only else ''} | {', '.join(t.schema.names)} |"
        for t in OUTPUT_TABLES.values()
    ]
    return [
        "",
        "## Tables in this directory",
        "",
        f"One folder per table (open the folder); every column is described in {tables.SCHEMA_DOC}. top_n "
        f"{shown.top_n}, similar_k {shown.similar_k}.",
        "",
        "| folder | one row per | columns |",
        "|---|---|---|",
        *rows,
        "| metrics.json | everything above in numbers (`rows`: each table's row count) | |",
        "",
    ]


def _reliability_section(metrics: dict[str, Any], figures: dict[str, str]) -> list[str]:
    deciles = metrics.get("reliability_deciles")
    if not deciles:
        return []
    s = metrics.get("reliability_summary", {})
    lines = [
        "",
        "## Reliability: calibration by decile of expected_abs_error",
        "",
        "Every prediction carries `expected_abs_error`: stage 2's estimate, in stars, of how far the predicted "
        "rating is from the real one (lower = more reliable; from its predicted squared error as sqrt(2/pi x "
        "pred_error), the mean absolute value of a normal error of that variance). Sorting the test ratings by it "
        "(decile 1 = most reliable) and measuring the real error in each decile shows whether it means "
        "something: the observed error should rise from decile 1 to 10 (the ordering) and sit near the predicted "
        "one (the calibration). The test ratings were never used to train any stage.",
        "",
    ]
    if "reliability" in figures:
        lines += [f"![predicted vs observed error by reliability decile]({figures['reliability']})", ""]
    lines += [
        "| decile | rows | expected_abs_error range | predicted abs error (mean) | observed abs error (MAE) "
        "| stage-1 MAE | RMSE | stage-1 RMSE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in deciles:
        lines.append(
            f"| {d['decile']} | {d['n']} | {_num(d.get('expected_abs_error_min'))}-"
            f"{_num(d.get('expected_abs_error_max'))} | {_num(d.get('mean_expected_abs_error'))} "
            f"| {_num(d.get('mae'))} | {_num(d.get('mf_mae'))} | {_num(d.get('rmse'))} | {_num(d.get('mf_rmse'))} |"
        )
    if s:
        lines += [
            "",
            f"Most reliable decile RMSE {s['most_reliable_rmse']:.3f} vs least reliable {s['least_reliable_rmse']:.3f} "
            f"({s['ratio']:.2f}x); Spearman correlation of predicted and observed squared error "
            f"{s['spearman_pred_vs_observed_sq_error']:.3f}.",
        ]
    return lines


RANKINGS = {
    "popularity": "popularity (most-rated movies)",
    "mf": "stage 1 MF (predicted rating)",
    "rating": "final (recommendations)",
    "single": "final (recommendations)",
}
CANDIDATES = {
    "ease": "EASE (which movies a user rates)",
    "ials": "implicit MF (which movies a user rates)",
    "mf": "stage 1's MF",
    "popularity": "the most-rated movies",
}
ORDERS = {
    "blend": "P(rated) x P(rating >= threshold | predicted rating, predicted error)",
    "rating": "predicted rating",
    "candidate": "the candidate score",
}


def _ranking_section(ranking: dict[str, Any]) -> list[str]:
    rows = {k: v for k, v in ranking.items() if isinstance(v, dict) and "users" in v}
    if not rows:
        return []
    k = ranking.get("k", 10)
    ratio = ranking.get("vs_popularity", {})
    candidates = ranking.get("rank_candidates", "mf")
    lines = [
        "",
        f"## Ranking on test (top {k})",
        "",
        f"Relevant: test ratings >= {ranking.get('relevance_threshold')}; candidates: movies without a train or "
        f"validation rating by the user, with at least {ranking.get('min_ratings', 1)} training rating(s). The "
        f"recommendations are the top {ranking.get('candidates')} of {CANDIDATES.get(candidates, candidates)}, "
        f"scored by the later stages and ordered by {ORDERS.get(ranking.get('rank_order', 'rating'), '')}. "
        "The popularity baseline ranks the same users' unseen movies by their training ratings; the last column "
        "is each ranking's NDCG over the baseline's (above 1: better than popularity).",
        "",
        f"| ranking by | Precision@{k} | Recall@{k} | NDCG@{k} | NDCG vs popularity | users |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: kv[0] != "popularity"):
        times = "1.00x" if name == "popularity" else (f"{ratio[name]:.2f}x" if name in ratio else "")
        lines.append(
            f"| {RANKINGS.get(name, name)} | {r[f'precision@{k}']:.4f} | {r[f'recall@{k}']:.4f} "
            f"| {r[f'ndcg@{k}']:.4f} | {times} | {r['users']} |"
        )
    return lines


def _movies_section(factors: pl.DataFrame | None, figures: dict[str, str], min_ratings: int) -> list[str]:
    if factors is None or factors.height == 0:
        return []
    rated = factors.filter(pl.col("n_train") >= min_ratings)
    if rated.height == 0:
        rated = factors
    lines = ["", "## Movies", ""]
    if "map" in figures:
        lines += [
            f"![movie map]({figures['map']})",
            "",
            "The most-rated movies on the first two principal components of the stage-1 item factors: movies "
            "close together are liked by the same users. Colour: the movie's bias.",
            "",
        ]
    for title, frame in (
        ("Highest bias (rated above what users and the mean predict)", rated.sort("bias", descending=True)),
        ("Lowest bias", rated.sort("bias")),
    ):
        lines += [
            f"{title}, movies with >= {min_ratings} training ratings:",
            "",
            "| movie | bias | ratings |",
            "|---|---|---|",
        ]
        lines += [f"| {_movie(r)} | {r['bias']:+.3f} | {r['n_train']} |" for r in frame.head(10).iter_rows(named=True)]
        lines.append("")
    return lines


def _refit_verdicts(start: dict[str, Any]) -> list[str]:
    """A warm stage refit cold: said first, since every figure after it is a cold fit's."""
    return [
        f"**Stage {name} was refit cold**: its warm start validated at RMSE {w['warm_val_rmse']:.4f} against the "
        f"previous run's {w['previous_val_rmse']:.4f}, worse by more than {w['tolerance']:.1%} "
        "(pipeline.warm.tolerance)."
        for name, entry in start.items()
        if (w := entry.get("fallback"))
    ]


_CARRIED = {
    "known_items": "known movies",
    "new_items": "new movies",
    "parameters": "weight tensors",
    "statistics": "input statistics",
}
"""The report's words for recdist.train.warm's counts (the others: their key with spaces)."""


def _start_section(metrics: dict[str, Any]) -> list[str]:
    """How each stage started (metrics.json `start`: recdist.train.warm.started): cold, or warm from which run
    and what it carried over, and on a fold-in night the recommendations kept."""
    start = metrics.get("start")
    if not start:
        return []
    lines = ["## How this run started", ""]
    sources = sorted({e["from"] for e in start.values() if e.get("from")})
    if not sources:
        return [*lines, "Cold: every stage trained from scratch (no warm start).", ""]
    lines += [f"Warm start from `{', '.join(sources)}`.", "", "| stage | start | epochs | carried over |"]
    lines.append("|---|---|---|---|")
    for name, e in start.items():
        how = e["start"]
        if how == "warm" and e.get("fold_in"):
            how += f", a fold-in (night {e['folded']} in a row)" if e.get("folded") else ", a fold-in"
        if e["start"] == "warm" and not e.get("epochs"):
            how += ": the previous weights kept"
        counts = (e.get("counts") or {}).items()
        carried = ", ".join(f"{v:,} {_CARRIED.get(k, k.replace('_', ' '))}" for k, v in counts)
        lines.append(f"| {name} | {how} | {e.get('epochs', '')} | {carried} |")
    scored = {name: e["scored"] for name, e in start.items() if e.get("scored")}
    if scored:
        each = ", ".join(f"{name} {s['computed']:,}" for name, s in scored.items())
        first = next(iter(scored.values()))
        lines += ["", f"Scores computed tonight, of {first['rows']:,} ratings: {each} (the ratings of the users whose "
                      f"predictions moved); the rest are linked from the previous run's scored tables, now "
                      f"{first['layers']} layers (written whole again after {first['max_layers']})."]  # fmt: skip
    kept = metrics.get("recommendations_kept")
    if kept:
        lines += ["", f"Recommendations: {kept['users']:,} users with nothing new kept the previous run's lists; "
                      f"{kept['ranked']:,} were ranked tonight."]  # fmt: skip
    return [*lines, ""]


def _movie(row: dict) -> str:
    """A movie as the report names it: its title, else (a source without a movies file) its id."""
    return row["title"] or f"movie {row['movie_id']}"


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _f(row: dict[str, Any], split: str, key: str) -> str:
    value = row.get(split, {}).get(key)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _histories(paths: dict[str, str]) -> dict[str, pl.DataFrame]:
    out = {}
    for stage, model_dir in paths.items():
        uri = storage.join(model_dir, "history.parquet")
        if storage.exists(uri):
            out[stage] = pl.from_arrow(storage.read_parquet(uri))
    return out


def reliability_png(deciles: list[dict[str, Any]]) -> bytes:
    """Bars: observed test MAE per decile of expected_abs_error; line: the mean expected_abs_error (calibration)."""
    from matplotlib.figure import Figure

    x = [d["decile"] for d in deciles]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.bar(x, [d["mae"] for d in deciles], color="tab:blue", label="observed abs error (final prediction, MAE)")
    if all(d.get("mf_mae") is not None for d in deciles):
        ax.plot(x, [d["mf_mae"] for d in deciles], "s--", color="tab:gray", label="stage-1 MAE")
    ax.plot(
        x,
        [d["mean_expected_abs_error"] for d in deciles],
        "o-",
        color="tab:orange",
        label="predicted: mean expected_abs_error",
    )
    ax.set_xticks(x)
    ax.set_xlabel("decile of expected_abs_error (1 = most reliable)")
    ax.set_ylabel("absolute error (stars)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Test error by reliability decile")
    return png_bytes(fig, tight_bbox=True)


def movie_map_png(factors: pl.DataFrame, n: int, labels: int = 25) -> bytes:
    """The n most-rated movies on (pc1, pc2), coloured by bias; the `labels` most-rated are named."""
    from matplotlib.figure import Figure

    top = factors.sort("n_train", descending=True).head(n)
    fig = Figure(figsize=(9, 7), dpi=100)
    ax = fig.add_subplot()
    points = ax.scatter(top["pc1"], top["pc2"], c=top["bias"], cmap="coolwarm", s=14, alpha=0.8)
    fig.colorbar(points, ax=ax, label="movie bias")
    for row in top.head(labels).iter_rows(named=True):
        name = _movie(row)[:28]
        ax.annotate(name, (row["pc1"], row["pc2"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("principal component 1 of item factors")
    ax.set_ylabel("principal component 2")
    ax.set_title(f"The {top.height} most-rated movies by their learned factors")
    return png_bytes(fig, tight_bbox=True)


def learning_curves_png(histories: dict[str, pl.DataFrame]) -> bytes:
    """One panel per stage: training loss (left axis) and validation RMSE (right axis) by epoch.

    Two axes because they are different units: the loss is a mean squared error (running, over the epoch's
    steps), the validation figure a root mean squared error; stage 2's are in squared-rating units.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(histories), 3.6), dpi=100, layout="constrained")
    for i, (stage, h) in enumerate(histories.items()):
        ax = fig.add_subplot(1, len(histories), i + 1)
        epochs = (h["epoch"] + 1).to_list()
        ax.plot(epochs, h["train_loss"].to_list(), "o-", color="tab:blue", label="training MSE")
        ax.set_ylabel("training MSE", color="tab:blue")
        ax.set_xlabel("epoch")
        ax.set_title(stage)
        if "val_rmse" in h.columns and h["val_rmse"].null_count() < h.height:
            right = ax.twinx()
            right.plot(epochs, h["val_rmse"].to_list(), "s-", color="tab:orange", label="validation RMSE")
            right.set_ylabel("validation RMSE", color="tab:orange")
        if len(epochs) == 1:
            ax.set_xticks(epochs)
    return png_bytes(fig, tight_bbox=True)
