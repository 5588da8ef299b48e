"""Training speed on synthetic ml-20m-shaped data (20M ratings, random 90/10 split), beside Spark MLlib ALS.

    .venv/bin/python bench/train_speed.py                 # everything (Spark's fit alone takes minutes)
    .venv/bin/python bench/train_speed.py --spark cached  # reuse Spark's last figures for this dataset
    .venv/bin/python bench/train_speed.py --rows 2000000  # a smaller run

Measured, on this machine's cores:
1. biased MF (rank 16) through recdist's Trainer in this process, one worker using every core: rows/s per
   epoch, the test RMSE after each epoch (evaluation not counted as training time), and the training time
   until the test RMSE reaches Spark ALS's; the same for recdist's ALS solver.
2. Spark MLlib ALS (pyspark, local[2], rank 16, 10 iterations, regParam 0.05) on the same split, in a child
   process: fit time and test RMSE.
3. The whole `recdist train` command (fresh process, local Ray cluster start-up, data loading, training,
   outputs) with 1 and 2 workers: wall time, test RMSE, rows/s per epoch.
4. rows/s of the autograd (MLP) models, default settings, in a second epoch on a sample of the training rows
   (CPU, and CUDA when present).
The synthetic release and the prepared dataset are cached under --cache and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RANK = 16
#: recdist's biased MF settings for this data (params, train); the bench's one tuned knob is the epoch count.
MF_PARAMS = {"rank": RANK, "reg": 0.015, "reg_bias": 0.01, "init_std": 0.05}
SGD_TRAIN = {"solver": "sgd", "lr": 0.04, "lr_schedule": "cosine", "patience": 0}
ALS_TRAIN = {"solver": "als", "patience": 0}
ALS_PARAMS = {"rank": RANK, "reg": 0.05, "reg_bias": 0.05, "init_std": 0.1}
SPARK = {"rank": RANK, "maxIter": 10, "regParam": 0.05}
MLP_MODELS = ("sigmoid_mf", "mf_residual_mlp", "ncf_mlp", "autoencoder", "reliability_mlp", "rating_mlp")
TARGETS = {"rows_per_s": 20e6, "time_to_spark": 4.0, "command": 45.0, "best_rmse": 0.750}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_263, help="synthetic ratings (default: ml-20m's count)")
    ap.add_argument("--cache", default=os.environ.get("RECDIST_BENCH_DIR", "/tmp/recdist-bench"))
    ap.add_argument("--epochs", type=int, default=4, help="SGD epochs (cosine schedule over them)")
    ap.add_argument("--als-epochs", type=int, default=4)
    ap.add_argument("--spark", choices=("run", "cached", "skip"), default="run")
    ap.add_argument("--mlp-rows", type=int, default=500_000, help="training rows sampled for the MLP rows/s")
    ap.add_argument("--skip-command", action="store_true", help="skip the `recdist train` runs")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    source = os.path.join(args.cache, f"synth-{args.rows}")
    data = os.path.join(args.cache, f"prepared-90-10-{args.rows}")
    ensure_synthetic(args.rows, source)
    ensure_prepared(source, data)
    print(f"data: {data} ({cores} cores, shared with other jobs while measured: figures are pessimistic)\n")

    spark = run_spark(data, args.cache, args.spark)
    target = spark["rmse"] if spark else None
    sgd = run_in_process(data, MF_PARAMS, {**SGD_TRAIN, "epochs": args.epochs}, target, "SGD")
    als = run_in_process(data, ALS_PARAMS, {**ALS_TRAIN, "epochs": args.als_epochs}, target, "ALS")
    mlp = mlp_speeds(data, args.mlp_rows, sgd.pop("model"))  # before the commands: their Ray lingers a while
    als.pop("model")
    commands = []
    if not args.skip_command:  # the same run as the in-process one: its schedule spans --epochs
        commands = [run_command(data, workers, args.epochs) for workers in (1, 2)]
    report(spark, sgd, als, commands, mlp)


# --------------------------------------------------------------------------------------------------- data


def ensure_synthetic(rows: int, out: str) -> None:
    """`recdist synth` defaults (scaled down for fewer rows, as bench/prepare.py does), written once."""
    from recdist import storage
    from recdist.config import SynthConfig
    from recdist.data.synth import MARKER, write_synthetic

    if storage.exists(os.path.join(out, MARKER)):
        return
    share = rows / 20_000_263
    cfg = SynthConfig(
        n_ratings=rows, n_users=max(50, round(138_493 * share)), n_items=max(50, round(26_744 * share**0.5))
    )
    start = time.perf_counter()
    write_synthetic(cfg, out, overwrite=True)
    print(f"wrote the synthetic release {out} in {time.perf_counter() - start:.1f} s")


def ensure_prepared(source: str, out: str) -> None:
    """The synthetic release prepared with a random 90/10 train/test split (no validation rows), 8 shards."""
    from recdist import storage
    from recdist.config import load_config
    from recdist.data.prepare import prepare

    if storage.is_committed(out):
        return
    cfg = load_config(
        None,
        {
            "source.path": os.path.join(source, "ratings.csv"),
            "prepare.split": "random",
            "prepare.val_fraction": 0.0,
            "prepare.test_fraction": 0.1,
            "prepare.shards": 8,
        },
    )
    start = time.perf_counter()
    prepare(cfg, out, overwrite=True)
    print(f"prepared {out} in {time.perf_counter() - start:.1f} s")


# --------------------------------------------------------------------------------------------------- recdist


def run_in_process(data: str, params: dict, train: dict, target: float | None, label: str) -> dict[str, Any]:
    """Fit biased MF with the Trainer on the whole dataset (one worker, all cores); per-epoch speed and RMSE."""
    from recdist.config import StageConfig, TrainConfig
    from recdist.train.data import load_rank_data
    from recdist.train.loop import Trainer
    from recdist.train.run import build_model

    start = time.perf_counter()
    ranked = load_rank_data(data, target="rating")
    loaded = time.perf_counter() - start
    stage = StageConfig(model="biased_mf", params=params, train=TrainConfig(**train))
    start = time.perf_counter()
    trainer = Trainer(build_model(stage, ranked.dims), stage.train, ranked)
    setup = time.perf_counter() - start
    print(f"{label}: biased_mf {params} {train}; load {loaded:.1f} s, solver set-up {setup:.1f} s")
    trained, epochs_to_target, time_to_target, rows = 0.0, None, None, []
    while not trainer.done:
        row = trainer.train_epoch()
        trained += row["seconds"]
        rmse = trainer.evaluate("test")["rmse"]
        rows.append({**row, "test_rmse": rmse, "trained": trained})
        print(
            f"  epoch {row['epoch'] + 1}: {row['rows_per_s'] / 1e6:6.1f} M ratings/s  {row['seconds']:5.2f} s  "
            f"training time {trained:5.2f} s  test RMSE {rmse:.4f}",
            flush=True,
        )
        if target is not None and epochs_to_target is None and rmse <= target:
            epochs_to_target, time_to_target = row["epoch"] + 1, trained
    return {
        "label": label,
        "rows": rows,
        "rows_per_s": float(np.median([r["rows_per_s"] for r in rows])),
        "best_rmse": min(r["test_rmse"] for r in rows),
        "epochs_to_target": epochs_to_target,
        "time_to_target": time_to_target,
        "setup": loaded + setup,
        "model": trainer.model,
    }


def run_command(data: str, workers: int, epochs: int) -> dict[str, Any]:
    """`recdist train` in a fresh process (its own local Ray cluster); wall time, metrics.json, history."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="recdist-train-speed-") as tmp:
        out = os.path.join(tmp, "mf")
        sets = [f"stages.single.params.{k}={v}" for k, v in MF_PARAMS.items()]
        sets += [f"stages.single.train.{k}={v}" for k, v in SGD_TRAIN.items()]
        cmd = [
            sys.executable, "-m", "recdist", "train", "--data", data, "--model", "biased_mf", "--out", out,
            "--workers", str(workers), "--epochs", str(epochs), "--quiet",
            *[x for s in sets for x in ("--set", s)],
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(f"`recdist train --workers {workers}` failed (exit {proc.returncode})")
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        speeds = pq.read_table(os.path.join(out, "history.parquet"))["rows_per_s"].to_pylist()
    result = {
        "workers": workers,
        "epochs": epochs,
        "wall": wall,
        "train_seconds": metrics["seconds"],
        "test_rmse": metrics["test"]["rmse"],
        "rows_per_s": float(np.median(speeds)),
    }
    print(
        f"`recdist train --workers {workers} --epochs {epochs}`: {wall:.1f} s wall, test RMSE "
        f"{result['test_rmse']:.4f}, {result['rows_per_s'] / 1e6:.1f} M ratings/s per epoch (median)",
        flush=True,
    )
    return result


def mlp_speeds(data: str, sample: int, mf: torch.nn.Module) -> list[dict[str, Any]]:
    """Each autograd model's second epoch on `sample` training rows: rows/s on CPU (and CUDA when present)."""
    from recdist.config import StageConfig, TrainConfig
    from recdist.models import registry
    from recdist.models.batch import Batch
    from recdist.schema import SESSION_COLUMNS
    from recdist.train.data import RankData, load_rank_data
    from recdist.train.loop import Trainer
    from recdist.train.run import build_model

    full = load_rank_data(data, target="rating")
    idx = torch.randperm(len(full.train), generator=torch.Generator().manual_seed(0))[:sample]
    train = full.train.take(idx)
    with torch.no_grad():
        mf_pred = mf.eval()(train).clamp(0.5, 5.0)
    columns = {"mf_pred": mf_pred, "error": (mf_pred - train.target).square()}
    columns["pred_error"] = columns["error"]
    # the session context of stages 2 and 3 (rows/s only: its values do not change the work)
    columns |= {name: torch.rand(len(mf_pred), generator=torch.Generator().manual_seed(1)) for name in SESSION_COLUMNS}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for name in MLP_MODELS:
            cls = registry.get(name).module
            target = columns["error"] if cls.target == "error" else train.target
            features = torch.stack([columns[c] for c in cls.inputs], 1) if cls.inputs else None
            rows = Batch(train.user, train.item, target, features, cls.inputs).to(device)
            ranked = RankData(rows, None, None, full.dims, context=rows)
            stage = StageConfig(model=name, train=TrainConfig(epochs=2, solver="autograd"))
            model = build_model(stage, full.dims).to(device)
            if cls.upstream:
                model.attach(mf.to(device))
            trainer = Trainer(model, stage.train, ranked, device)
            trainer.train_epoch()  # the first epoch allocates optimiser state: time the second
            row = trainer.train_epoch()
            results.append({"model": name, "device": device, "rows_per_s": row["rows_per_s"]})
            print(f"  {name} on {device}: {row['rows_per_s'] / 1e6:.2f} M rows/s (batch {stage.train.batch_size})")
    return results


# --------------------------------------------------------------------------------------------------- spark


def run_spark(data: str, cache: str, mode: str) -> dict[str, Any] | None:
    """Spark ALS's fit time and test RMSE (a child process), or the figures cached for this dataset."""
    if mode == "skip":
        return None
    saved = os.path.join(cache, f"spark-als-{Path(data).name}.json")
    if mode == "cached" and os.path.exists(saved):
        result = json.load(open(saved))
        print(f"Spark ALS (cached {saved}): fit {result['fit']:.1f} s, test RMSE {result['rmse']:.4f}")
        return result
    print("Spark ALS: local[2], fitting (minutes) ...", flush=True)
    proc = subprocess.run(
        [sys.executable, __file__, "--child-spark", data], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit("the Spark run failed (pyspark and Java 17 are needed: pip install -e '.[bench]')")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    json.dump(result, open(saved, "w"))
    print(f"Spark ALS: fit {result['fit']:.1f} s, test RMSE {result['rmse']:.4f} (total {result['total']:.0f} s)")
    return result


def spark_child(data: str) -> None:
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    start = time.perf_counter()
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.memory", "8g")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    frame = spark.read.parquet(os.path.join(data, "ratings")).select("user_idx", "item_idx", "rating", "split")
    train = frame.filter("split = 'train'").drop("split").cache()
    test = frame.filter("split = 'test'").drop("split").cache()
    train.count(), test.count()
    als = ALS(userCol="user_idx", itemCol="item_idx", ratingCol="rating", coldStartStrategy="drop", seed=0, **SPARK)
    fit_start = time.perf_counter()
    model = als.fit(train)
    fit = time.perf_counter() - fit_start
    rmse = RegressionEvaluator(metricName="rmse", labelCol="rating").evaluate(model.transform(test))
    blas = _spark_blas(spark)
    spark.stop()
    print(json.dumps({"fit": fit, "rmse": rmse, "total": time.perf_counter() - start, "blas": blas, **SPARK}))


def _spark_blas(spark) -> str:
    """The BLAS and LAPACK classes Spark's ALS ran on: JNIBLAS where a native libblas.so.3 loads, else the JVM's
    own (VectorBLAS: SIMD through the JDK's vector API). Here the JVM's is the faster peer: with Debian's OpenBLAS
    installed the 20M fit took 55-58 s against 47.5 s (2026-12-04), its small rank-16 calls paying JNI each time."""
    netlib = spark.sparkContext._jvm.dev.ludovic.netlib
    try:
        names = (netlib.blas.BLAS.getInstance(), netlib.lapack.LAPACK.getInstance())
        return " + ".join(str(x.getClass().getSimpleName()) for x in names)
    except Exception as e:  # a Spark without dev.ludovic.netlib: say so, never fail the bench for it
        return f"unknown ({type(e).__name__})"


# --------------------------------------------------------------------------------------------------- report


def report(spark, sgd, als, commands, mlp) -> None:
    def verdict(ok: bool) -> str:
        return "yes" if ok else "NO"

    print("\n| measure | recdist | peer / target | ratio | met |")
    print("|---|---:|---:|---:|---|")
    one = next((c for c in commands if c["workers"] == 1), None)
    two = next((c for c in commands if c["workers"] == 2), None)
    print(
        f"| biased MF rank {RANK}, SGD, 1 worker x {os.cpu_count()} cores (in process), M ratings/s per epoch "
        f"| {sgd['rows_per_s'] / 1e6:.1f} | >= {TARGETS['rows_per_s'] / 1e6:.0f} | "
        f"{sgd['rows_per_s'] / TARGETS['rows_per_s']:.2f} | {verdict(sgd['rows_per_s'] >= TARGETS['rows_per_s'])} |"
    )
    for c in (one, two):
        if c:
            print(
                f"| same through `recdist train --workers {c['workers']}`, M ratings/s per epoch "
                f"| {c['rows_per_s'] / 1e6:.1f} | >= {TARGETS['rows_per_s'] / 1e6:.0f} | "
                f"{c['rows_per_s'] / TARGETS['rows_per_s']:.2f} | {verdict(c['rows_per_s'] >= TARGETS['rows_per_s'])} |"
            )
    if spark:
        print(
            f"| Spark ALS (local[2], rank {RANK}, 10 it., reg 0.05): fit s / test RMSE | | "
            f"{spark['fit']:.1f} s / {spark['rmse']:.4f} | | |"
        )
        for run in (sgd, als):
            t = run["time_to_target"]
            if t is None:
                print(f"| {run['label']}: training time to Spark's test RMSE | not reached | <= 4 s | | NO |")
                continue
            print(
                f"| {run['label']}: training time to Spark's test RMSE ({run['epochs_to_target']} epochs) | {t:.2f} s "
                f"| Spark fit {spark['fit']:.1f} s; target <= 4 s | {spark['fit'] / t:.0f}x faster | "
                f"{verdict(t <= TARGETS['time_to_spark'])} |"
            )
        for c in (one, two):
            if c:
                reached = c["test_rmse"] <= spark["rmse"]
                print(
                    f"| whole `recdist train --workers {c['workers']} --epochs {c['epochs']}` (Ray start, load, "
                    f"train, write), s | {c['wall']:.1f} | <= 45 s; Spark fit {spark['fit']:.1f} s | "
                    f"{spark['fit'] / c['wall']:.1f}x faster | {verdict(c['wall'] <= TARGETS['command'] and reached)} "
                    f"(test RMSE {c['test_rmse']:.4f}) |"
                )
    for run in (sgd, als):
        print(
            f"| best test RMSE, {run['label']} ({len(run['rows'])} epochs) | {run['best_rmse']:.4f} | <= 0.750"
            + (f"; Spark {spark['rmse']:.4f}" if spark else "")
            + f" | | {verdict(run['best_rmse'] <= TARGETS['best_rmse'])} |"
        )
    print(
        f"| ALS vs SGD: seconds per epoch | {np.median([r['seconds'] for r in als['rows']]):.2f} vs "
        f"{np.median([r['seconds'] for r in sgd['rows']]):.2f} | | | |"
    )
    for m in mlp:
        print(f"| {m['model']} ({m['device']}, autograd, batch 8192), M rows/s | {m['rows_per_s'] / 1e6:.2f} | | | |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child-spark":
        spark_child(sys.argv[2])
    else:
        main()
