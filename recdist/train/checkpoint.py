"""A Trainer's state as a checkpoint directory: weights as safetensors, the rest as JSON and tensor-only files.

Nothing is unpickled on load: the solver's state goes through torch.save and comes back with
torch.load(weights_only=True), which accepts tensors and plain Python values only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class CheckpointPolicy:
    """When an epoch ends in a checkpoint: every `every_epochs`-th epoch, or the first epoch ending
    `every_seconds` after the latest checkpoint (0 turns either off). The final state is always checkpointed,
    whatever the policy (run.py's last report)."""

    every_epochs: int = 1
    every_seconds: float = 0.0

    def due(self, epochs_done: int, seconds_since: float) -> bool:
        if self.every_epochs and epochs_done % self.every_epochs == 0:
            return True
        return bool(self.every_seconds) and seconds_since >= self.every_seconds


MODEL = "model.safetensors"
BEST = "best.safetensors"
SOLVER = "solver.pt"
PROGRESS = "progress.json"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_state(state: dict[str, Any], directory: str, **extra: Any) -> None:
    """Write Trainer.state_dict() (plus JSON-able `extra` values, e.g. attempt, final metrics) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    save_file(_tensors(state["model"]), os.path.join(directory, MODEL))
    if state.get("best_model") is not None:
        save_file(_tensors(state["best_model"]), os.path.join(directory, BEST))
    torch.save(state["solver"], os.path.join(directory, SOLVER))
    with open(os.path.join(directory, PROGRESS), "w") as f:
        json.dump({**state["progress"], **extra}, f)


def load_state(directory: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state save_state wrote, tensors on `device`; extra values come back inside state["progress"]."""
    device = str(device)
    best = os.path.join(directory, BEST)
    with open(os.path.join(directory, PROGRESS)) as f:
        progress = json.load(f)
    return {
        "model": load_file(os.path.join(directory, MODEL), device=device),
        "best_model": load_file(best, device=device) if os.path.exists(best) else None,
        "solver": torch.load(os.path.join(directory, SOLVER), map_location=device, weights_only=True),
        "progress": progress,
    }
