"""Save and load models as tensors (safetensors) plus a JSON description; never pickle.

URI/model.safetensors holds the full state_dict (frozen buffers included); URI/model.json holds the registry
name, the config params and the dims to rebuild the module before the tensors are loaded into it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from recdist import storage
from recdist.errors import StorageError
from recdist.models import registry
from recdist.models.base import Model
from recdist.models.batch import Dims

FORMAT = "recdist-model"
VERSION = 1
TENSORS = "model.safetensors"
META = "model.json"


def save_model(model: Model, uri: str) -> None:
    """Write URI/model.safetensors then URI/model.json (local path or s3://)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(uri, TENSORS), save_tensors(state, metadata={"format": FORMAT}))
    storage.write_json(storage.join(uri, META), describe(model))


def describe(model: Model) -> dict[str, Any]:
    """What model.json holds: format, registry name, params, dims."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": model.registry_name,
        "params": model.config.model_dump(mode="json"),
        "dims": dataclasses.asdict(model.dims),
    }


def model_class(uri: str) -> type[Model]:
    """The registered class of the model at `uri`, from its model.json alone (no tensors read)."""
    return registry.get(_meta(uri)[0]).module


def model_dims(uri: str) -> Dims:
    """The Dims the model at `uri` was built from (sizes, global mean, rating scale), from its model.json alone."""
    return _meta(uri)[2]


def _meta(uri: str) -> tuple[str, dict[str, Any], Dims]:
    """(registry name, params, dims) from URI/model.json; StorageError when it is not a model description."""
    meta_uri = storage.join(uri, META)
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
        return meta["name"], meta["params"], Dims(**meta["dims"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise StorageError(
            f"not a recdist model description: {e}",
            where=meta_uri,
            fix="point at a directory written by `recdist train`",
        ) from e


def load_model(uri: str, device: str | torch.device = "cpu") -> Model:
    """Rebuild the model named in URI/model.json and load URI/model.safetensors into it; eval mode."""
    name, params, dims = _meta(uri)
    entry = registry.get(name)
    model = entry.module(registry.validate(name, params), dims, torch.Generator().manual_seed(0))
    tensors_uri = storage.join(uri, TENSORS)
    try:
        state = load_tensors(storage.read_bytes(tensors_uri))
    except SafetensorError as e:
        raise StorageError(
            f"unreadable model tensors: {e}",
            where=tensors_uri,
            fix="the file is damaged or incomplete: retrain or copy it again",
        ) from e
    model.resize_for(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise StorageError(
            f"model tensors do not match {name!r} with these params: {e}",
            where=tensors_uri,
            fix="model.json and model.safetensors must come from the same training run",
        ) from e
    return model.to(device).eval()
