"""Model registry: name -> (nn.Module class, config class). Models register themselves on import."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from recdist.config import Section
from recdist.errors import ConfigError

if TYPE_CHECKING:
    from recdist.models.base import Model


@dataclass(frozen=True)
class Entry:
    name: str
    module: type[Model]
    config: type[Section]
    summary: str


_REGISTRY: dict[str, Entry] = {}


def register(name: str, config: type[Section]) -> Callable[[type[Model]], type[Model]]:
    """Class decorator: make a model buildable by name with its config class."""

    def wrap(cls: type[Model]) -> type[Model]:
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Entry(name, cls, config, doc[0] if doc else "")
        cls.registry_name = name
        return cls

    return wrap


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> Entry:
    _load()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown model {name!r}", fix=f"{hint}choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def validate(name: str, params: dict[str, Any]) -> Section:
    """The model's typed config from a params dict; unknown or bad fields raise ConfigError."""
    entry = get(name)
    try:
        return entry.config.model_validate(params)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  - {loc}: {msg}")
        raise ConfigError(
            f"invalid params for model {name!r}:\n" + "\n".join(lines),
            fix=f"valid params: {', '.join(entry.config.model_fields)}",
        ) from None


def _load() -> None:
    import recdist.models  # noqa: F401  (imports every model module, which registers it)
