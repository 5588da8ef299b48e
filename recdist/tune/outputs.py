"""A search's outputs for analysts: trials.parquet, best.yaml and the val RMSE plot (through recdist.storage)."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import yaml

from recdist import storage
from recdist.config import StageConfig
from recdist.figures import png_bytes
from recdist.models.space import Knob

#: trials.parquet's fixed columns; one column per searched knob follows (named by its key, e.g. params.rank).
TRIAL_COLUMNS = [
    pa.field("trial_id", pa.string()),
    pa.field("status", pa.string()),  # finished | stopped (by ASHA or the time budget) | failed
    pa.field("val_rmse", pa.float64()),  # the best epoch's validation RMSE
    pa.field("epochs", pa.int32()),  # epochs trained
    pa.field("best_epoch", pa.int32()),  # 1-based
    pa.field("seconds", pa.float64()),  # the trial's wall time
    pa.field("error", pa.string()),
]


def trial_rows(grid: Any, spec: Any) -> list[dict[str, Any]]:
    """One dict per trial of a Tune ResultGrid: the fixed columns and `values` (the decoded knobs)."""
    from recdist.tune.trial import decode

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or metrics.get("config") or {}
        rmse = metrics.get("best_val_rmse")
        status = "failed" if result.error else "finished" if metrics.get("final") else "stopped"
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or str(result.path).rstrip("/").rsplit("/", 1)[-1],
                "status": status,
                "val_rmse": float(rmse) if rmse is not None and math.isfinite(float(rmse)) else None,
                "epochs": int(metrics.get("epochs_done", 0)),
                "best_epoch": int(metrics.get("best_epoch", 0)),
                "seconds": float(metrics.get("time_total_s", 0.0)),
                "error": str(result.error).strip().splitlines()[-1][:500] if result.error else None,
                "values": decode(spec.knobs, config),
            }
        )
    rows.sort(key=lambda r: (r["val_rmse"] is None, r["val_rmse"] or 0.0, r["trial_id"]))
    return rows


def trials_table(rows: list[dict[str, Any]], keys: list[str]) -> pa.Table:
    """trials.parquet: the fixed columns, then one per knob (a list value, e.g. hidden sizes, as text)."""
    columns = {f.name: [r[f.name] for r in rows] for f in TRIAL_COLUMNS}
    fields = list(TRIAL_COLUMNS)
    for key in keys:
        values = [r["values"].get(key) for r in rows]
        if any(isinstance(v, list | tuple) for v in values):
            values = [None if v is None else "x".join(str(x) for x in v) for v in values]
        array = pa.array(values)
        fields.append(pa.field(key, array.type if array.type != pa.null() else pa.string()))
        columns[key] = values
    schema = pa.schema(fields)
    return pa.Table.from_pydict(columns, schema=schema)


def write_trials(rows: list[dict[str, Any]], keys: list[str], uri: str) -> None:
    storage.write_parquet(trials_table(rows, keys), uri)


def best_fragment(best: StageConfig, slot: str) -> dict[str, Any]:
    """The config fragment that sets stages.<slot> to the best settings (merged by a later --config)."""
    return {"stages": {slot: best.model_dump(mode="json", exclude={"tune"})}}


def write_best_yaml(best: StageConfig, slot: str, row: dict[str, Any], trials: int, data: str, uri: str) -> None:
    header = (
        f"# recdist tune: the best of {trials} trials of {best.model} on {data}\n"
        f"# (trial {row['trial_id']}: val RMSE {row['val_rmse']:.4f}, best epoch {row['best_epoch']}).\n"
        f"# Merge it into a pipeline config: recdist pipeline --config PIPELINE.yaml --config best.yaml ...\n"
    )
    body = yaml.safe_dump(best_fragment(best, slot), sort_keys=False, default_flow_style=None)
    storage.write_bytes(uri, (header + body).encode())


def plot_png(rows: list[dict[str, Any]], knobs: dict[str, Knob], title: str = "") -> bytes:
    """Validation RMSE of every trial against each searched knob (log axes for log knobs), the best starred."""
    from matplotlib.figure import Figure

    keys = list(knobs) or ["trial"]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), dpi=100)
    scored = [r for r in rows if r["val_rmse"] is not None]
    best = min(scored, key=lambda r: r["val_rmse"]) if scored else None
    colours = {"finished": "tab:blue", "stopped": "tab:gray", "failed": "tab:red"}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        knob = knobs.get(key)
        labels: list[str] = []
        if knob is not None and knob.kind == "choice":
            labels = [_label(v) for v in knob.values]
        for status, colour in colours.items():
            part = [r for r in scored if r["status"] == status]
            if part:
                ax.scatter([_x(r, key, labels) for r in part], [r["val_rmse"] for r in part], s=22, alpha=0.75,
                           color=colour, label=status)  # fmt: skip
        if best is not None:
            ax.scatter([_x(best, key, labels)], [best["val_rmse"]], marker="*", s=180, color="tab:orange",
                       edgecolors="black", zorder=5, label="best")  # fmt: skip
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 4 else 0)
        elif knob is not None and knob.log:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.set_xlabel(key)
        ax.set_ylabel("validation RMSE")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return png_bytes(fig)


def write_plot(rows: list[dict[str, Any]], knobs: dict[str, Knob], uri: str, title: str = "") -> None:
    storage.write_bytes(uri, plot_png(rows, knobs, title))


def _label(value: Any) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)


def _x(row: dict[str, Any], key: str, labels: list[str]) -> float:
    if key == "trial":
        return float(row["trial_id"][-3:]) if row["trial_id"][-3:].isdigit() else 0.0
    value = row["values"].get(key)
    if labels:
        return float(labels.index(_label(value))) if _label(value) in labels else -1.0
    return float(value)
