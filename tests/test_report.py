"""The run report judged on hand-made metrics: verdicts, baselines beside the models, run metadata."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import polars as pl
import pytest

from recdist.config import Config, load_config
from recdist.infer import metrics as m
from recdist.report import decile_order, render, verdicts


def deciles(first: float, last: float) -> list[dict]:
    step = (last - first) / 9
    return [
        {"decile": d, "n": 100, "expected_abs_error_min": 0.3 + 0.05 * d, "expected_abs_error_max": 0.35 + 0.05 * d,
         "mean_expected_abs_error": 0.32 + 0.05 * d, "mae": 0.7 * (first + step * (d - 1)),
         "mf_mae": 0.71 * (first + step * (d - 1)), "rmse": first + step * (d - 1), "mf_rmse": first + step * (d - 1)}
        for d in range(1, 11)
    ]


METRICS = {
    "mf": {"test": {"rmse": 0.8500, "mae": 0.66, "n": 1000}, "train": {"rmse": 0.77, "mae": 0.6, "n": 4000}},
    "reliability": {"test": {"rmse": 0.93, "mae": 0.61, "n": 1000}},
    "rating": {"test": {"rmse": 0.8330, "mae": 0.65, "n": 1000}, "val": {"rmse": 0.83, "mae": 0.65, "n": 500}},
    "baselines": {"global_mean": {"rmse": 1.05, "mae": 0.85, "n": 1000}, "item_mean": {"rmse": 0.95, "mae": 0.76,
                                                                                       "n": 1000}},
    "ranking": {
        "k": 10, "relevance_threshold": 4.0, "candidates": 100, "min_ratings": 20,
        "popularity": {"precision@10": 0.05, "recall@10": 0.08, "ndcg@10": 0.1000, "users": 300},
        "mf": {"precision@10": 0.06, "recall@10": 0.10, "ndcg@10": 0.1200, "users": 300},
        "rating": {"precision@10": 0.07, "recall@10": 0.11, "ndcg@10": 0.1500, "users": 300},
        "vs_popularity": {"mf": 1.2, "rating": 1.5},
    },
    "reliability_deciles": deciles(0.60, 1.00),
    "reliability_summary": {"most_reliable_rmse": 0.6, "least_reliable_rmse": 1.0, "ratio": 1.67,
                            "spearman_pred_vs_observed_sq_error": 0.2},
    "cold": {"test": {"rows": 1000, "cold": 3}, "train": {"rows": 4000, "cold": 0}},
}
INFO = {"date": "2026-12-01T12:00:00+00:00", "data": "synthetic (5,500 ratings) at runs/q/data",
        "config_hash": "0123456789abcdef", "version": "9.9.9"}


def report(metrics: dict, config: Config | None = None) -> str:
    return render(metrics, {}, None, config or Config(), INFO)


def test_verdicts_come_first_and_judge_each_question():
    text = report(METRICS)
    verdict = text[text.index("## Verdict"):text.index("## Accuracy")]
    assert text.index("## Verdict") < text.index("## Accuracy") < text.index("## Reliability")
    assert "**Stage 3 is better than stage 1 on test RMSE**: 0.8330 vs 0.8500 (-2.00%)." in verdict
    assert "**The final ranking is better than stage 1 MF's on NDCG@10**: 0.1500 vs 0.1200 (+25.00%)." in verdict
    assert "**The final model is better than the movie-mean baseline on test RMSE**: 0.8330 vs 0.9500" in verdict
    assert "global mean scores 1.0500" in verdict
    assert "**Reliability is strong**: the least reliable decile's test RMSE is 1.67x the most reliable's" in verdict
    assert "Spearman of decile vs its RMSE 1.00" in verdict
    assert "**The final ranking beats the popularity baseline**: NDCG@10 0.1500 vs 0.1000 (1.50x)." in verdict


def test_worse_stage_3_weak_reliability_and_below_popularity_are_said_so():
    worse = copy.deepcopy(METRICS)
    worse["rating"]["test"]["rmse"] = 0.8600
    worse["ranking"]["rating"]["ndcg@10"] = 0.0800
    worse["ranking"]["vs_popularity"]["rating"] = 0.8
    worse["reliability_deciles"] = deciles(0.80, 0.84)
    lines = verdicts(worse)
    assert any("Stage 3 is worse than stage 1 on test RMSE**: 0.8600 vs 0.8500 (+1.18%)" in line for line in lines)
    assert any("final ranking is worse than stage 1 MF's" in line and "(-33.33%)" in line for line in lines)
    assert any("**Reliability is weak**: the least reliable decile's test RMSE is 1.05x" in line for line in lines)
    assert any("falls below the popularity baseline" in line and "(0.80x)" in line for line in lines)


def test_a_change_of_twice_or_more_is_given_as_a_factor_not_a_percentage():
    far = copy.deepcopy(METRICS)
    far["ranking"]["mf"]["ndcg@10"] = 0.0051
    far["ranking"]["rating"]["ndcg@10"] = 0.1144
    lines = verdicts(far)
    assert any("final ranking is better than stage 1 MF's" in line and "0.1144 vs 0.0051 (22.4x)." in line
               for line in lines)  # fmt: skip
    far["ranking"]["rating"]["ndcg@10"] = 0.0020
    assert any("final ranking is worse than stage 1 MF's" in line and "(0.4x)" in line for line in verdicts(far))


def test_a_tiny_difference_is_no_difference_and_shuffled_deciles_are_weak():
    same = copy.deepcopy(METRICS)
    same["rating"]["test"]["rmse"] = 0.85001
    shuffled = deciles(0.6, 1.0)
    for d, rmse in zip(shuffled, [1.0, 0.6, 0.9, 0.7, 0.8, 0.65, 0.95, 0.75, 0.85, 0.62], strict=True):
        d["rmse"] = rmse
    same["reliability_deciles"] = shuffled
    lines = verdicts(same)
    assert any("Stage 3 is no different from stage 1 on test RMSE" in line for line in lines)
    assert any("Reliability is weak" in line for line in lines)  # decile 10 below decile 1, no order
    assert decile_order(deciles(0.6, 1.0)) == pytest.approx(1.0)


def test_baselines_sit_beside_the_models_and_run_metadata_heads_the_report():
    text = report(METRICS)
    assert "| baseline: global training mean | | | 1.0500 | 0.8500 | 1000 |" in text
    assert "| baseline: movie's training mean | | | 0.9500 | 0.7600 | 1000 |" in text
    assert text.index("| 3 rating |") < text.index("| baseline: global training mean |")
    head = text[: text.index("## Verdict")]
    for value in INFO.values():
        assert value in head


def test_older_metrics_without_baselines_say_so_and_a_single_pipeline_judges_what_it_has():
    older = {k: v for k, v in METRICS.items() if k != "baselines"}
    assert any("Baselines: not computed for this run" in line for line in verdicts(older))
    single = {"single": METRICS["rating"], "baselines": METRICS["baselines"],
              "ranking": {**METRICS["ranking"], "single": METRICS["ranking"]["rating"]}}
    single["ranking"].pop("rating")
    cfg = load_config(None, {"pipeline.kind": "single"})
    text = report(single, cfg)
    assert "Stage 3" not in text and "Reliability is" not in text
    assert "**The final model is better than the movie-mean baseline" in text and "beats the popularity" in text
    assert "## Verdict" not in render({}, {}, None, Config())  # nothing to judge, no empty section


def test_mean_baselines_from_shard_sums():
    shards = [
        pl.DataFrame({"split": ["train", "train", "test"], "item_idx": [0, 0, 0], "rating": [4.0, 2.0, 3.0]}),
        pl.DataFrame({"split": ["train", "test", "val"], "item_idx": [1, 2, 1], "rating": [5.0, 4.0, 1.0]}),
    ]
    test = pl.concat([s.filter(pl.col("split") == "test") for s in shards])
    base = m.mean_baselines(pl.concat([m.item_sums(s) for s in shards]), test)
    mu = 11 / 3  # training ratings only; movie 2 has none: the global mean
    assert base["global_mean"]["rmse"] == pytest.approx((((3 - mu) ** 2 + (4 - mu) ** 2) / 2) ** 0.5)
    assert base["item_mean"]["rmse"] == pytest.approx((((3 - 3) ** 2 + (4 - mu) ** 2) / 2) ** 0.5)
    assert base["item_mean"]["n"] == 2
    assert m.mean_baselines(pl.concat([m.item_sums(s) for s in shards]), test.head(0)) == {}


def test_report_functions_stay_short():
    source = (Path(__file__).resolve().parents[1] / "recdist" / "report.py").read_text()
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1}" for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 >= 60]
    assert long == []


def test_the_reliability_section_is_a_calibration_table_in_stars():
    text = report(METRICS)
    section = text[text.index("## Reliability"):text.index("## Ranking")]
    assert "expected_abs_error" in section and "lower = more reliable" in section
    header = "| decile | rows | expected_abs_error range | predicted abs error (mean) | observed abs error (MAE) "
    assert header in section
    assert "| 1 | 100 | 0.350-0.400 | 0.370 | 0.420 | 0.426 | 0.600 | 0.600 |" in section


def test_movies_without_titles_are_named_by_their_ids():
    """A source without a movies file (synthetic data, a bare ratings file): the bias tables name each movie by
    its id, not 'None'."""
    factors = pl.DataFrame({"movie_id": [7, 9, 11], "title": [None, "Heat (1995)", None], "bias": [0.9, 0.1, -1.2],
                            "n_train": [40, 50, 60]}, schema_overrides={"title": pl.String})
    text = render(METRICS, {}, factors, Config(), INFO)
    section = text[text.index("## Movies"):]
    assert "| movie 7 | +0.900 | 40 |" in section and "| Heat (1995) | +0.100 | 50 |" in section
    assert "| movie 11 | -1.200 | 60 |" in section and "None" not in section


def test_the_report_says_how_the_run_started_and_a_refit_comes_first():
    """A warm run's report names its source, what each stage carried over and the kept recommendations; a stage
    refit cold is the first verdict; a cold run says so in one line."""
    start = {
        "mf": {"start": "warm", "epochs": 4, "from": "runs/date=2026-12-01", "fold_in": True, "folded": 2,
               "counts": {"new_users": 7, "new_items": 3, "training_rows": 5113}},
        "reliability": {"start": "warm", "epochs": 0, "from": "runs/date=2026-12-01", "fold_in": True,
                        "counts": {"parameters": 6, "statistics": 3},
                        "scored": {"computed": 16202, "rows": 100836, "layers": 3, "max_layers": 8}},
        "rating": {"start": "refit cold", "epochs": 9, "from": "runs/date=2026-12-01",
                   "fallback": {"warm_val_rmse": 0.84, "previous_val_rmse": 0.83, "tolerance": 0.005}},
    }  # fmt: skip
    text = report({**METRICS, "start": start, "recommendations_kept": {"users": 589, "ranked": 21}})
    section = text[text.index("## How this run started") : text.index("## Accuracy")]
    assert "Warm start from `runs/date=2026-12-01`." in section
    assert "| mf | warm, a fold-in (night 2 in a row) | 4 | 7 new users, 3 new movies, 5,113 training rows |" in section
    kept = "| reliability | warm, a fold-in: the previous weights kept | 0 | 6 weight tensors, 3 input statistics |"
    assert kept in section
    assert "| rating | refit cold | 9 |  |" in section
    assert "589 users with nothing new kept the previous run's lists; 21 were ranked tonight." in section
    assert "Scores computed tonight, of 100,836 ratings: reliability 16,202 (the ratings of the users" in section
    assert "linked from the previous run's scored tables, now 3 layers (written whole again after 8)" in section
    verdict = text[text.index("## Verdict") : text.index("## How this run started")]
    first = verdict.splitlines()[2]
    assert first.startswith("- **Stage rating was refit cold**") and "0.8400 against the previous run's 0.8300" in first
    cold = report({**METRICS, "start": {"mf": {"start": "cold", "epochs": 20}}})
    assert "Cold: every stage trained from scratch (no warm start)." in cold
