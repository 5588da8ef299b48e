"""A training run's history as analysts get it: one Parquet row per epoch and a learning-curve PNG.

Pure functions of the list of epoch dicts the Trainer returns; they write through recdist.storage (local or
s3://).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

from recdist import storage
from recdist.figures import png_bytes

#: history.parquet: one row per trained epoch (attempt: the Ray Train attempt that ran it; 0 = first).
HISTORY = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("train_loss", pa.float64()),
        pa.field("val_rmse", pa.float64()),
        pa.field("val_mae", pa.float64()),
        pa.field("rows_per_s", pa.float64()),
        pa.field("lr", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("attempt", pa.int32()),
    ]
)


def history_table(rows: Sequence[dict[str, float]]) -> pa.Table:
    """The epoch dicts as a table of HISTORY's columns (NaN validation figures become nulls)."""
    columns = {}
    for field in HISTORY:
        values = [row.get(field.name) for row in rows]
        columns[field.name] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    columns["attempt"] = [0 if v is None else v for v in columns["attempt"]]
    return pa.Table.from_pydict(columns, schema=HISTORY)


def write_history(rows: Sequence[dict[str, float]], uri: str) -> None:
    storage.write_parquet(history_table(rows), uri)


def learning_curve_png(rows: Sequence[dict[str, float]], title: str = "") -> bytes:
    """Train loss and validation MSE (left axis) and validation RMSE (right axis) against the epoch."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global backend state

    epochs = [int(r["epoch"]) + 1 for r in rows]
    val_rmse = [float(r.get("val_rmse", math.nan)) for r in rows]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train loss (MSE)", color="tab:blue")
    ax.plot(epochs, [v * v for v in val_rmse], "s-", label="validation MSE", color="tab:orange")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean squared error")
    rmse_ax = ax.twinx()
    rmse_ax.plot(epochs, val_rmse, "^--", label="validation RMSE", color="tab:green")
    rmse_ax.set_ylabel("validation RMSE")
    handles = ax.get_legend_handles_labels()
    more = rmse_ax.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return png_bytes(fig)


def write_learning_curve(rows: Sequence[dict[str, float]], uri: str, title: str = "") -> None:
    storage.write_bytes(uri, learning_curve_png(rows, title))
