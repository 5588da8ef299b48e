"""What runs the worker loop (recdist.train.run.run_worker): its rank and world, its device, the checkpoint it resumes
from and where its reports go.

`WorkerSession` is a Ray Train worker's (a TorchTrainer rank); `InProcessSession` runs the one rank in the caller's
process (ClusterConfig.in_process: Ray Train's local mode, a TorchTrainer of no workers, whose reports stay in
memory), its checkpoints persisted beside the stage's Ray Train runs so that a killed run
resumes the same way; recdist.tune.trial.TrialSession runs it in a Ray Tune trial.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from recdist import storage
from recdist.train import checkpoint

CHECKPOINTS_KEPT = 2
"""Checkpoints kept per run (the latest ones; enough to survive a failure while one is written)."""


class WorkerSession:
    """A Ray Train worker's session (a TorchTrainer's rank)."""

    #: True: every epoch reports its metrics (a Tune scheduler's clock), with a checkpoint only when the policy
    #: says so. False (Ray Train: each report waits for the controller's next poll): reports only with checkpoints.
    reports_every_epoch = False

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, gpu: bool) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device() if gpu else torch.device("cpu")

    def latest_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        """Report `metrics`, with the checkpoint written in `directory` when there is one."""
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


def persisted(uri: str) -> Any:
    """Ray Train's Checkpoint of a checkpoint directory at `uri` (local or s3://; `as_directory` downloads it)."""
    import ray.train

    fs, path = storage.arrow_filesystem(uri)
    return ray.train.Checkpoint(path, filesystem=fs)


class InProcessSession:
    """Rank 0 of 1 in this process. Checkpoints go to `root`/checkpoint-NNNNNN (committed whole, the latest
    CHECKPOINTS_KEPT kept); `latest_checkpoint` finds the newest one, so re-running a killed stage resumes."""

    rank, world = 0, 1
    reports_every_epoch = False

    def __init__(self, root: str) -> None:
        self.root = root
        self.last: Any = None
        """The latest checkpoint this session persisted (`persisted`), None before its first."""

    def device(self, gpu: bool) -> torch.device:
        return torch.device("cuda", 0) if gpu else torch.device("cpu")

    def _saved(self) -> list[str]:
        return [n for n in storage.listdir(self.root) if n.startswith("checkpoint-") and not any(
            tag in n for tag in storage.LEFTOVER_TAGS
        )]  # fmt: skip

    def latest_checkpoint(self) -> Any:
        saved = self._saved()
        return persisted(storage.join(self.root, saved[-1])) if saved else None

    def report(self, metrics: dict[str, Any], directory: str | None) -> None:
        """Persist the checkpoint written in `directory` (metrics travel inside it: progress.json)."""
        if directory is None:
            return
        saved = self._saved()
        number = int(saved[-1].removeprefix("checkpoint-")) + 1 if saved else 0
        uri = storage.join(self.root, f"checkpoint-{number:06d}")
        with storage.staged_output(uri, overwrite=True, marker=checkpoint.PROGRESS) as staging:
            names = sorted(os.listdir(directory), key=lambda n: n == checkpoint.PROGRESS)  # the marker last
            for name in names:
                with open(os.path.join(directory, name), "rb") as f:
                    storage.write_bytes(storage.join(staging, name), f.read())
        self.last = persisted(uri)
        for old in [*saved, uri.rsplit("/", 1)[-1]][:-CHECKPOINTS_KEPT]:
            storage.remove(storage.join(self.root, old))
