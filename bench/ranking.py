"""Top-N ranking options on finished pipeline runs: which candidate model and which final order beat a popularity
list, measured with the pipeline's own protocol (recdist/infer/outputs.py: RankingProtocol).

    .venv/bin/python bench/ranking.py                         # runs the two pipelines below first if absent
    .venv/bin/python bench/ranking.py --runs /tmp/rk/mls /tmp/rk/syn

Runs (made with the pipeline itself, then only their outputs are re-ranked here, in process, no Ray):
  mls: configs/ml-latest-small.yaml on the real ml-latest-small (../shared/data/ml-latest-small);
  syn: configs/quickstart.yaml's pipeline (its source and synth sections dropped) on `recdist synth
       --users 4000 --items 3000 --ratings 300000 --rank 12 --noise 0.8 --seed 3` (a generator setting the
       shipped configs were not chosen on).
Per option: Precision/Recall/NDCG@k on test among movies with >= recommend_min_ratings training ratings that
the user has no train or validation rating for (relevant: test rating >= the threshold), the ratio of NDCG to
the popularity baseline's, and the seconds to fit the candidate model. The rating side (stages 1-3, their test
RMSE) is the run's and does not change with the ranking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
SHARED = Path(os.environ.get("RECDIST_SHARED", ROOT.parent / "shared"))
RECDIST = [sys.executable, "-m", "recdist"]

OPTIONS = [  # (candidate model, its settings, final order[, candidates / threshold_shift of the blend])
    ("mf", {}, "rating"),
    ("mf", {}, "blend"),
    ("ease", {"reg": 1.0}, "candidate"),
    ("ease", {"reg": 4.0}, "candidate"),
    ("ease", {"reg": 8.0}, "candidate"),
    ("ease", {"reg": 16.0}, "candidate"),
    ("ease", {"reg": 8.0}, "rating"),
    ("ease", {"reg": 2.0}, "blend"),
    ("ease", {"reg": 4.0}, "blend"),
    ("ease", {"reg": 8.0}, "blend"),
    ("ease", {"reg": 16.0}, "blend"),
    ("ease", {"reg": 4.0}, "blend", {"candidates": 200}),
    ("ease", {"reg": 4.0}, "blend", {"candidates": 50}),
    ("ease", {"reg": 4.0}, "blend", {"threshold_shift": 0.25}),  # at the threshold itself (half stars)
    ("ials", {"rank": 32, "alpha": 10.0, "reg": 0.1}, "candidate"),
    ("ials", {"rank": 32, "alpha": 10.0, "reg": 0.1}, "blend"),
]


def make_runs(out: Path) -> list[Path]:
    """The two pipeline runs, made with the pipeline command where absent."""
    out.mkdir(parents=True, exist_ok=True)
    mls, syn, synth = out / "mls", out / "syn", out / "synth-data"
    if not (mls / "outputs" / "_SUCCESS").exists():
        data = SHARED / "data" / "ml-latest-small"
        cmd = [*RECDIST, "pipeline", "--config", str(ROOT / "configs/ml-latest-small.yaml"), "--path", str(data)]
        subprocess.run([*cmd, "--out", str(mls), "-q", "--overwrite"], check=True)
    if not (syn / "outputs" / "_SUCCESS").exists():
        if not (synth / "synth.json").exists():
            subprocess.run(
                [*RECDIST, "synth", "--out", str(synth), "--users", "4000", "--items", "3000", "--ratings", "300000",
                 "--rank", "12", "--noise", "0.8", "--seed", "3", "-q", "--overwrite"],
                check=True,
            )  # fmt: skip
        import yaml

        config = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
        for section in ("source", "synth"):  # the data comes from --path
            config.pop(section)
        (out / "syn.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [*RECDIST, "pipeline", "--config", str(out / "syn.yaml"), "--path", str(synth)]
        subprocess.run([*cmd, "--out", str(syn), "-q", "--overwrite"], check=True)
    return [mls, syn]


def measure(run: Path, options: list) -> tuple[dict, list[dict]]:
    import polars as pl
    import torch

    from recdist.config import load_config
    from recdist.data.dataset import read_manifest, read_rank
    from recdist.infer.outputs import RankingProtocol, Rated, _top_matrix, ranker_for
    from recdist.infer.recommend import run_models
    from recdist.infer.scoring import one_thread
    from recdist.models.implicit import fit_ease, fit_ials

    cfg = load_config(str(run / "config.yaml")).pipeline
    manifest = json.loads((run / "outputs" / "manifest.json").read_text())
    models = run_models(str(run), manifest)
    metrics = json.loads((run / "outputs" / "metrics.json").read_text())
    scored = read_rank(models.scored, columns=["user_idx", "item_idx", "rating", "split"])
    scored = scored.with_columns(pl.col("split").cast(pl.String))
    split = pl.col("split")
    pairs = scored.select("user_idx", "item_idx", is_test=split == "test", is_train=split == "train")
    test = scored.filter(pl.col("split") == "test")
    n_users = int(read_manifest(models.data)["n_users"])
    k, threshold, shown = cfg.evaluation.ranking_k, cfg.evaluation.relevance_threshold, cfg.outputs
    protocol = RankingProtocol.build(Rated.of(pairs, n_users).known(), test, n_users, k, threshold)
    assert protocol is not None
    settings = {"rank_candidates": "mf", "rank_order": "blend", "relevance_threshold": threshold}
    base = ranker_for(models, shown.recommend_min_ratings, ranking=settings)  # its threshold: the blend's
    final = "rating" if "rating" in metrics else "single"
    info = {
        "run": run.name,
        "users": len(protocol.users),
        "movies": int(base.allowed.sum()),
        "test_rmse": metrics[final]["test"]["rmse"],
        "k": k,
    }
    rows = [
        {"candidates": "popularity", "order": "", "fit_s": 0.0, **protocol.popularity(base.popularity, base.allowed)}
    ]
    train = scored.filter(pl.col("split") == "train")
    users, items = (torch.from_numpy(train[c].to_numpy().astype("int64")) for c in ("user_idx", "item_idx"))
    fitted: dict[str, object] = {}
    with one_thread():
        for kind, params, order, *more in options:
            extra = more[0] if more else {}
            key = f"{kind} {params}"
            t0 = time.perf_counter()
            if kind != "mf" and key not in fitted:
                if kind == "ease":
                    fitted[key] = fit_ease(users, items, n_users, len(base.allowed), modelled=base.allowed, **params)
                else:
                    fitted[key] = fit_ials(users, items, n_users, len(base.allowed), **params)
            fit_s = time.perf_counter() - t0
            retrieval = fitted.get(key)
            threshold = base.threshold + extra.get("threshold_shift", 0.0)
            ranker = dataclasses.replace(base, retrieval=retrieval, order=order, threshold=threshold)
            n_candidates = extra.get("candidates", shown.candidates)
            ranked = ranker.rank(protocol.users, k, candidates=n_candidates, exclude=protocol.exclude)
            r = protocol.score(_top_matrix(ranked, protocol.row_of, len(protocol.users), k))
            name = kind + (" " + ", ".join(f"{a}={b}" for a, b in params.items()) if params else "")
            if extra:
                order += (
                    " ("
                    + ", ".join(f"{a} {b:+g}" if a == "threshold_shift" else f"{a} {b}" for a, b in extra.items())
                    + ")"
                )
            rows.append({"candidates": name, "order": order, "fit_s": fit_s, **r})
    return info, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", help="finished pipeline runs (default: make them under --out)")
    ap.add_argument("--out", default="/tmp/recdist-bench/ranking", help="where the runs are made")
    args = ap.parse_args()
    runs = [Path(r) for r in args.runs] if args.runs else make_runs(Path(args.out))
    for run in runs:
        info, rows = measure(run, OPTIONS)
        k = info["k"]
        pop = rows[0][f"ndcg@{k}"]
        print(
            f"\n{info['run']}: {info['users']} users with a relevant test rating, {info['movies']} recommendable "
            f"movies, final test RMSE {info['test_rmse']:.4f}\n"
        )
        print(f"| candidates | order | P@{k} | R@{k} | NDCG@{k} | x popularity | fit s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['candidates']} | {r['order']} | {r[f'precision@{k}']:.4f} | {r[f'recall@{k}']:.4f} "
                f"| {r[f'ndcg@{k}']:.4f} | {r[f'ndcg@{k}'] / pop:.2f} | {r['fit_s']:.1f} |"
            )


if __name__ == "__main__":
    main()
