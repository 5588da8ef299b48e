"""Search spaces: which knobs of a stage `recdist tune` varies, and over what (pure declarations, no Ray).

Each model's config class declares its default space beside its fields (`search_space`, a ClassVar): a mapping
from a stage key, `params.<field>` (the model's own config) or `train.<field>` (TrainConfig), to a Knob. A user
changes a space with the same keys, written as YAML values (`--space KEY=VALUE`, or a stage's `tune.space`):

    {loguniform: [0.001, 0.1]}    a float, log-uniform between the bounds
    {uniform: [0.0, 0.5]}         a float, uniform
    {int: [8, 256]}               an integer, uniform (both bounds included)
    {logint: [8, 256]}            an integer, log-uniform
    [32, 64, 128]                 one of these values ([[64, 32], [128, 64]] for list-valued params)
    0.05                          fixed: no longer searched

`check_space` validates a space against a stage before any trial: unknown keys, malformed knobs and bounds the
stage's typed config would refuse are all ConfigErrors naming the key.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from recdist.errors import ConfigError

KnobKind = Literal["loguniform", "uniform", "int", "logint", "choice", "fixed"]
RANGES = ("loguniform", "uniform", "int", "logint")
FORMS = "{loguniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]}, {logint: [lo, hi]}, [a, b, ...] or a value"


@dataclass(frozen=True)
class Knob:
    """One searched setting: a range (kind in RANGES, low and high) or a list of values (choice, fixed)."""

    kind: KnobKind
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "logint")

    def endpoints(self) -> list[Any]:
        """Values the knob can take at its extremes (every value of a choice): what validation tries."""
        if self.kind in ("choice", "fixed"):
            return list(self.values)
        cast = int if self.kind in ("int", "logint") else float
        return [cast(self.low), cast(self.high)]

    def describe(self) -> str:
        if self.kind == "fixed":
            return repr(self.values[0])
        if self.kind == "choice":
            return "one of " + ", ".join(repr(v) for v in self.values)
        return f"{self.kind} [{self.low:g}, {self.high:g}]"


def loguniform(low: float, high: float) -> Knob:
    return Knob("loguniform", low, high)


def uniform(low: float, high: float) -> Knob:
    return Knob("uniform", low, high)


def integer(low: int, high: int, *, log: bool = False) -> Knob:
    return Knob("logint" if log else "int", low, high)


def choice(*values: Any) -> Knob:
    return Knob("choice", values=tuple(values))


def parse_knob(key: str, value: Any) -> Knob:
    """A knob from its YAML form (see the module doc); a ConfigError naming `key` for anything else."""
    if isinstance(value, Knob):
        return value
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in RANGES:
            raise _bad(key, value, f"a range is one of {', '.join(RANGES)} with [low, high]")
        kind, bounds = next(iter(value.items()))
        if not isinstance(bounds, list | tuple) or len(bounds) != 2 or not all(_number(b) for b in bounds):
            raise _bad(key, value, f"{kind} takes two numbers [low, high]")
        low, high = float(bounds[0]), float(bounds[1])
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise _bad(key, value, "low must be below high, both finite")
        if kind in ("loguniform", "logint") and low <= 0:
            raise _bad(key, value, f"{kind} needs low > 0")
        if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
            raise _bad(key, value, f"{kind} takes whole numbers")
        return Knob(kind, low, high)
    if isinstance(value, list | tuple):
        if not value:
            raise _bad(key, value, "a choice needs at least one value")
        values = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return Knob("choice" if len(values) > 1 else "fixed", values=values)
    if value is None:
        raise _bad(key, value, "give a value or a range")
    return Knob("fixed", values=(value,))


def mlp_knobs(reg_high: float) -> dict[str, Knob]:
    """The search knobs every factors-plus-MLP model shares (hidden widths, dropout, embedding reg, Adam's rate,
    epochs); a model adds its own size knob (rank or dim)."""
    return {
        "params.hidden": choice((32,), (64, 32), (128, 64)),
        "params.dropout": uniform(0.0, 0.5),
        "params.reg": loguniform(0.001, reg_high),
        "train.lr": loguniform(0.0005, 0.02),
        "train.epochs": integer(5, 30),
    }


def merge_space(base: dict[str, Knob], overrides: dict[str, Any] | None) -> dict[str, Knob]:
    """The base space with the user's knobs (YAML forms) added or replacing; `null` removes a key."""
    space = dict(base)
    for key, value in (overrides or {}).items():
        if value is None:
            space.pop(key, None)
        else:
            space[key] = parse_knob(key, value)
    return space


def check_space(space: dict[str, Knob], stage: Any) -> None:
    """Refuse, before any trial, a key that is not a field of the stage's model config or TrainConfig, and a
    knob whose values the stage's typed config would refuse (each bound and each choice is tried)."""
    from recdist.config import StageConfig, TrainConfig
    from recdist.models import registry

    if not space:
        raise ConfigError(
            f"nothing to search for model {stage.model!r}: its search space is empty",
            fix="add knobs with --space, e.g. --space train.lr='{loguniform: [0.001, 0.1]}'",
        )
    fields = {
        "params": list(registry.get(stage.model).config.model_fields),
        "train": list(TrainConfig.model_fields),
    }
    for key, knob in space.items():
        section, _, name = key.partition(".")
        if section not in fields or not name:
            raise ConfigError(
                f"unknown search knob {key!r}: a knob is params.<field> or train.<field>",
                fix=f"e.g. params.{fields['params'][0]} or train.lr" if fields["params"] else "e.g. train.lr",
            )
        if name not in fields[section]:
            close = difflib.get_close_matches(name, fields[section], n=1)
            hint = f"did you mean {section}.{close[0]}? " if close else ""
            raise ConfigError(
                f"unknown search knob {key!r} for model {stage.model!r}",
                fix=f"{hint}{section} fields: {', '.join(fields[section])}",
            )
        for value in knob.endpoints():
            try:
                StageConfig.model_validate(apply(stage.model_dump(mode="json", exclude={"tune"}), {key: value}))
            except (ValidationError, ConfigError) as e:  # from StageConfig, or the registry for params
                why = e.errors()[0]["msg"] if isinstance(e, ValidationError) else e.what.split("\n")[-1].strip(" -")
                raise ConfigError(
                    f"search knob {key} ({knob.describe()}): the value {value!r} is not valid for it: {why}",
                    fix="change the knob's bounds or values (`recdist models` shows each param's meaning)",
                ) from None


def apply(stage: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A stage dict (model, params, train) with dotted knob values set; the input is not changed."""
    out = {**stage, "params": dict(stage.get("params") or {}), "train": dict(stage.get("train") or {})}
    for key, value in values.items():
        section, _, name = key.partition(".")
        out[section][name] = list(value) if isinstance(value, tuple) else value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"bad search knob {key}: {value!r}: {why}", fix=f"write it as {FORMS}")
