"""The main job: prepare -> stage 1 MF -> stage 2 reliability -> stage 3 rating -> analyst outputs and report.

Each stage writes into RUN/<stage>/ and commits by writing RUN/<stage>/manifest.json last, with its config
hash; hashes chain (a stage's hash includes its upstream's), so a changed upstream config invalidates every
stage after it. Re-running the same command skips committed stages whose hash matches and resumes an
incomplete one (its committed parts, e.g. a trained model, are kept when RUN/<stage>/intent.json shows the
same hash; an uncommitted Ray Train run resumes from its checkpoints). A committed stage of another config
is never replaced without `overwrite=True` or `from_stage` at or before it, and then it is rebuilt beside
(RUN/<stage>.next) and swapped in whole; the later stages are stale from then on (recdist.integrity) until redone.
Every committed stage a run skips is verified against its manifest first; one run holds the directory's lock
(recdist.runlock). `kind: single` runs one model (stages.single) with the same outputs.

RUN layout: manifest.json (the run: hashes and times of the stages done), config.yaml, logs/ (the driver's
log, a file per invocation), data/ (when prepared here), mf/ (model/, folds/<k>/ when cross-fitting, scored/
with mf_pred, error and the session context), reliability/ (model/, scored/ + pred_error), rating/ (model/,
scored/ + pred_rating), outputs/ (a folder per analyst table, figures/, metrics.json, report.md, SCHEMA.md,
manifest.json, then _SUCCESS: recdist.tables). With
pipeline.train_share.fraction < 1, mf/scored/sample/ and reliability/scored/sample/ hold the seeded share of
training rows (and the validation rows) that stages 2 and 3 train on. Every manifest is a recdist.manifest model.

The dataset's training rows are read once per run (infer.plan.trained_on) and that view is passed to every
stage's scoring pass; the session context is a feature step the pipeline adds to stage 1's pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from recdist import drift, figures, imports, integrity, logs, runlock, storage, tables
from recdist.config import Config, to_yaml
from recdist.errors import ConfigError, StorageError
from recdist.manifest import (
    OutputsManifest,
    RunManifest,
    RunModels,
    ScoredManifest,
    StageManifest,
    file_entries,
    relative,
    resolve,
)
from recdist.schema import SPLITS
from recdist.train import warm as warm_rules
from recdist.train.cluster import WorkerPlan
from recdist.train.sampling import SAMPLE, TrainShare
from recdist.train.warm import WarmStart

if TYPE_CHECKING:
    import numpy as np

    from recdist.infer.outputs import Carry
    from recdist.infer.plan import TrainedOn
    from recdist.infer.scored import Delta

log = logging.getLogger(__name__)

#: Test and chaos hook: the pipeline stops with an error right after committing this stage.
STOP_AFTER_ENV = "RECDIST_STOP_AFTER_STAGE"
INTENT = "intent.json"
NEXT = ".next"
"""RUN/<stage>.next/: where a committed stage is rebuilt (--from, --overwrite) before it is swapped in whole."""
RNCF_STAGES = ("mf", "reliability", "rating")
SELF_STAGED = ("prepare", "outputs")
"""Stages committed in one staged_output (built beside and swapped in by it); the others build in RUN/<stage>.next."""


def stage_names(config: Config, *, prepared: bool) -> list[str]:
    """The stages of this config, in order ("prepare" only when the run prepares its own data)."""
    models = list(RNCF_STAGES) if config.pipeline.kind == "rncf" else ["single"]
    return (["prepare"] if prepared else []) + models + ["outputs"]


def data_identity(manifest: dict[str, Any]) -> str:
    """What identifies a prepared dataset given with --data: its config hash, source checksum and counts."""
    keys = ("config_hash", "source_checksum", "n_ratings", "n_users", "n_items", "splits")
    return _digest({k: manifest.get(k) for k in keys})


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "mf": ("stages.mf", "pipeline.crossfit", "pipeline.train_share", "pipeline.session"),
    "reliability": ("stages.reliability",),
    "rating": ("stages.rating",),
    "single": ("stages.single",),
    "outputs": ("pipeline.kind", "pipeline.outputs", "pipeline.evaluation"),
}
"""The config sections each stage's hash covers (Config.section_hash). Where the job runs (cluster) and how fast
inference goes (pipeline.inference) are in none: they do not change what a stage computes."""


STAGE_INPUTS = ("pipeline.session", "pipeline.crossfit")
"""Stage 1's sections that shape what stages 2 and 3 read beside the factors (the session context's windows, the
cross-fitted residuals): yesterday's stage-2/3 weights fit only inputs made alike."""


def stage_hashes(config: Config, data_id: str, warm: WarmStart | dict[str, WarmStart] | None = None) -> dict[str, str]:
    """Each stage's hash: its own config sections (STAGE_SECTIONS) plus its upstream stage's hash (a chain); a
    stage's warm start (its source run, model and that run's stage hash: a WarmStart per stage name, or stage
    1's alone) and pipeline.warm are part of that stage's hash (so of every later one's)."""
    sources = {"mf": warm} if isinstance(warm, WarmStart) else dict(warm or {})
    hashes: dict[str, str] = {"prepare": data_id}
    upstream = data_id
    for name in stage_names(config, prepared=False):
        hashes[name] = upstream = _digest([upstream, config.section_hash(*STAGE_SECTIONS[name])])
        if sources.get(name) is not None:
            source = [sources[name].to_json(), config.section_hash("pipeline.warm")]
            hashes[name] = upstream = _digest([upstream, source])
    return hashes


def warm_sources(config: Config, warm: WarmStart | None) -> dict[str, WarmStart]:
    """The warm start of each stage that starts warm: stage 1 from `warm`, stages 2 and 3 from the same run's
    models where their inputs still fit (recdist.train.warm.misfit); the others cold, said in the log."""
    if warm is None:
        return {}
    warm_rules.folds_in(config.stages.mf, config.pipeline.warm)  # a fold-in stage 1 can freeze rows, or says why
    sources = {"mf": warm}
    for name in RNCF_STAGES[1:] if config.pipeline.kind == "rncf" else ():
        source = warm_rules.stage_source(warm.run, name)
        why = "no committed stage there" if source is None else None
        why = why or warm_rules.misfit(source.model, config.stages.slot(name), config.stages.mf, warm.model)
        why = why or sections_differ(warm.run, config, STAGE_INPUTS)
        if why:
            log.info("%s: starts cold, not from %s: %s", name, warm.run, why)
        else:
            sources[name] = source
    return sources


@dataclass
class _Run:
    """One pipeline invocation: where things are and how to run a stage."""

    config: Config
    out: str
    data: str
    hashes: dict[str, str]
    overwrite: bool
    names: list[str] = field(default_factory=list)
    warm: WarmStart | None = None
    """Stage 1's warm start (--warm-start): the previous run it starts from."""
    warm_stages: dict[str, WarmStart] = field(default_factory=dict)
    """Each stage that starts warm and its source (warm_sources): stage 1's is `warm`."""
    states: dict[str, str | None] = field(default_factory=dict)
    """Each stage's committed hash (None: not committed) when the run started."""
    stale: list[str] = field(default_factory=list)
    """Committed stages with this config's hash made from an upstream stage redone since (recdist.integrity)."""
    building: dict[str, str] = field(default_factory=dict)
    """The stages being rebuilt beside their committed directory (RUN/<stage>.next) in this run."""
    run_id: str = ""
    """RUN/manifest.json's run_id: kept across resumes, stamped into every output file."""
    plan: WorkerPlan | None = None
    """Where the stages train and score (recdist.train.cluster.worker_plan); set before the first model stage."""
    _trained: TrainedOn | None = None
    _unchanged: Any = None
    _moved: Any = None

    def unchanged(self) -> np.ndarray:
        """bool per user index: the users with nothing new since the warm start's dataset, any split (read once:
        recdist.train.warm.changed_users)."""
        if self._unchanged is None:
            assert self.warm is not None
            self._unchanged = ~warm_rules.changed_users(self.warm.data, self.data, every_split=True)
        return self._unchanged

    def moved(self) -> np.ndarray:
        """bool per user index: the users whose predictions a fold-in night computes (read once:
        recdist.infer.scored.delta_users)."""
        from recdist.infer.scored import delta_users

        if self._moved is None:
            assert self.warm is not None
            self._moved = delta_users(self.warm.data, self.data, self.unchanged())
        return self._moved

    def folded_in(self, stage: str) -> str | None:
        """Why `stage`'s outputs cannot be taken over from the warm start's run in a fold-in night, or None when
        they can: its model folded in (no epochs, no refit), and this dataset kept that run's indices."""
        from recdist.data.dataset import read_manifest

        if self.warm is None or not self.config.pipeline.warm.fold_in:
            return "no fold-in"
        trained = storage.read_json(storage.join(self.dir(stage), "model", "metrics.json"))
        if not (trained.get("warm_start") or {}).get("fold_in") or trained.get("warm_fallback"):
            return f"{stage} was not part of the fold-in"
        if read_manifest(self.data).get("previous") != self.warm.data:
            return "this dataset did not keep its user and movie indices"
        return None

    def dir(self, stage: str) -> str:
        """Where the stage is (or is being built, for a committed stage this run rebuilds)."""
        return self.building.get(stage) or self.committed_dir(stage)

    def committed_dir(self, stage: str) -> str:
        return self.data if stage == "prepare" else storage.join(self.out, stage)

    def fix(self, stage: str) -> str:
        """How to redo a stage found damaged or stale."""
        if stage == "prepare" and "prepare" not in self.names:
            return f"prepare the dataset again (recdist prepare ... --out {self.data} --overwrite), then re-run"
        return f"redo it from there: re-run this command with --from {stage} (later stages are redone too)"

    def inputs(self, stage: str) -> dict[str, str]:
        """The committed directories a stage is made from: the dataset and every stage before it."""
        before = self.names[: self.names.index(stage)] if stage in self.names else []
        found = {"prepare": self.data} | {n: self.committed_dir(n) for n in before if n != "prepare"}
        return integrity.pins(found, self.committed_dir(stage))

    def stamp(self) -> tables.Stamp:
        """What every output file records about the run (Parquet key-value metadata, the report's head)."""
        from recdist import __version__

        return tables.Stamp(__version__, self.run_id, self.config.digest(), tables.git_commit())

    def trained(self) -> TrainedOn:
        """The dataset's training rows as every model of the run sees them: read once, on first use."""
        from recdist.infer.plan import trained_on

        if self._trained is None:
            cfg = self.config
            self._trained = trained_on(self.data, cfg.pipeline.crossfit.folds, cfg.stages.mf.train.seed)
        return self._trained


def run_pipeline(
    config: Config,
    out: str,
    *,
    data: str | None = None,
    from_stage: str | None = None,
    overwrite: bool = False,
    warm_start: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline into the run directory `out`; return the run summary.

    warm_start: a previous run directory (or `auto`) whose models the stages start from (recdist.train.warm):
    stage 1 its factors and biases by original ids, stages 2 and 3 its weights where their inputs still fit
    (warm_sources); trained as config.pipeline.warm says, refit cold when worse than the previous run's.

    data: an already prepared dataset URI (else config.source is prepared into RUN/data). from_stage: redo
    from this stage on. overwrite: replace committed stages made by another config. One line per stage and
    per epoch goes to the log (recdist.logs), and a copy of it to RUN/logs/pipeline-<UTC time>.log.
    """
    out = storage.absolute(out)
    storage.check_writable(out)
    created = not storage.exists(out) or not storage.listdir(out)
    try:
        with runlock.locked(out):
            return _locked_run(config, out, data, from_stage, overwrite, warm_start)
    except BaseException:
        if created and not storage.listdir(out):  # a refused run leaves no empty directory behind
            storage.remove(out)
        raise


def _locked_run(
    config: Config, out: str, data: str | None, from_stage: str | None, overwrite: bool, warm_start: str | None = None
) -> dict[str, Any]:
    """run_pipeline, holding the run directory's lock."""
    from recdist.train.cluster import worker_plan

    run, names, first, previous = _plan(config, out, data, from_stage, overwrite, warm_start)
    config = run.config  # with the warm start's dataset as prepare.previous (_keeping_ids_of)
    _remove_leftovers(run, names[:first])
    storage.write_bytes(storage.join(run.out, "config.yaml"), to_yaml(config).encode())
    run.run_id = previous.get("run_id") or new_run_id()
    summary = RunManifest(
        run_id=run.run_id,
        pipeline=config.pipeline.kind,
        config_hash=config.digest(),
        data=_inside(run.data, run.out),
        stages={n: previous.get("stages", {}).get(n) for n in names[:first]},
        created_at=previous.get("created_at") or _now(),
        files=file_entries(run.out, ["config.yaml"]),
        warm_start=run.warm.to_json() if run.warm else None,
    )
    summary.write(run.out)
    with logs.run_log(storage.join(run.out, "logs"), "pipeline") as run_log:
        summary.log = _inside(run_log.uri, run.out)  # in RUN/manifest.json from the first stage's commit on
        for name in names[:first]:
            log.info("%s: committed with the same config, skipped", name)
        for name in run.stale:
            log.info("%s: stale (made from an upstream stage redone since), redone", name)
        if any(name not in ("prepare", "outputs") for name in names[first:]):
            run.plan = worker_plan(config.cluster)  # Ray joined or started here, unless the run needs none
            if run.plan.in_process:  # Ray Train's local mode (0.7 s of imports): meanwhile, beside prepare
                imports.prefetch("ray.train.torch")
        warm_pending = run.plan is not None and not run.plan.in_process
        started = time.perf_counter()
        for name in names[first:]:
            runlock.check(run.out)  # an s3:// lease taken over by another run: commit nothing more
            if warm_pending and name not in ("prepare", "outputs"):  # Ray Data's passes follow this training
                _warm_scoring(run)
                warm_pending = False
            _run_stage(run, name, summary)
            run_log.sync()
        runlock.check(run.out)
        summary.status = "complete"
        summary.seconds = round(time.perf_counter() - started, 2)
        summary.report = "outputs/report.md"
        summary.write(run.out)
        log.info("complete in %.1f s: %s", summary.seconds, storage.join(run.out, summary.report))
    return _absolute(summary.model_dump(mode="json"), run.out)


def _warm_scoring(run: _Run) -> None:
    """Start the worker processes the run's Ray Data passes will score in, while stage 1 trains
    (ray_data.warm_workers: one per task a pass runs), and import Ray Data in this process meanwhile."""
    from recdist.data.dataset import read_manifest
    from recdist.infer.ray_data import warm_workers

    shards = int(read_manifest(run.data)["shards"])
    warm_workers(run.config.pipeline.inference.actors, run.config.cluster.gpu, shards)
    imports.prefetch("ray.data")


def _inside(uri: str, out: str) -> str:
    """`uri` relative to the run directory when it is inside it, else as it is (a dataset given with --data)."""
    rel = relative(uri, out)
    return uri if rel == ".." or rel.startswith("../") or "://" in rel or rel.startswith("/") else rel


def _absolute(summary: dict[str, Any], out: str) -> dict[str, Any]:
    """The run summary as callers print it: RUN/manifest.json's paths (relative to the run, so that a run can
    be moved or copied) resolved against the run directory."""
    for key in ("data", "log", "report"):
        if summary.get(key):
            summary[key] = resolve(summary[key], out)
    return summary


def _refreshing(config: Config, warm: WarmStart | None) -> tuple[Config, WarmStart | None]:
    """Tonight's config and stage-1 warm start: a fold-in (pipeline.warm.fold_in) counts its nights in a row in
    the warm start (WarmStart.folded), and the refresh_every-th starts warm without folding in (every row trains,
    every user is ranked: recdist.config.WarmConfig.refresh_every), said in the log and in its config.yaml."""
    settings = config.pipeline.warm
    if warm is None or not settings.fold_in:
        return config, warm
    before = warm_rules.nights_folded_in(warm.run)
    if settings.refresh_every is None or before + 1 < settings.refresh_every:
        return config, replace(warm, folded=before + 1)
    log.info(
        "warm start without a fold-in tonight: the last %d runs folded in (pipeline.warm.refresh_every %d): every "
        "row trains and every user is ranked", before, settings.refresh_every,
    )  # fmt: skip
    refreshed = config.model_copy(deep=True)
    refreshed.pipeline.warm.fold_in = False
    return refreshed, warm


def _keeping_ids_of(config: Config, warm: WarmStart | None) -> Config:
    """The config of a run that prepares its own dataset: starting warm, it keeps the user and movie indices and
    the splits of the dataset the warm start's stage 1 trained on (prepare.previous, in the dataset's hash), so
    yesterday's factors line up with today's rows; a prepare.previous of the config's own wins."""
    if warm is None or config.prepare.previous:
        return config
    log.info("prepare: keeps the indices and splits of %s (the warm start's dataset, prepare.previous)", warm.data)
    kept = config.model_copy(deep=True)
    kept.prepare.previous = warm.data
    return kept


def _plan(
    config: Config, out: str, data: str | None, from_stage: str | None, overwrite: bool, warm_start: str | None = None
) -> tuple[_Run, list[str], int, dict[str, Any]]:
    """Check everything cheap before any work: the run, its stages, the first to run, the previous manifest."""
    from recdist.data.dataset import read_manifest

    out, data = storage.absolute(out), storage.absolute(data) if data else None
    storage.check_writable(out)
    previous = _check_run_dir(out, overwrite)
    warm = warm_rules.resolve(warm_start, beside=out) if warm_start else None
    config, warm = _refreshing(config, warm)
    if data is not None:
        data_id, data_uri = data_identity(read_manifest(data)), data
    else:
        config = _keeping_ids_of(config, warm)
        data_id, data_uri = config.dataset_hash(), storage.join(out, "data")
    names = stage_names(config, prepared=data is None)
    if from_stage is not None and from_stage not in names:
        raise ConfigError(f"unknown stage {from_stage!r} for --from", fix=f"choose one of: {', '.join(names)}")
    _check_single_model(config)
    sources = warm_sources(config, warm)
    run = _Run(config, out, data_uri, stage_hashes(config, data_id, sources), overwrite, names=names, warm=warm)
    run.warm_stages = sources
    states = {name: _state(run, name) for name in names}
    run.stale = [n for n in names if states[n] == run.hashes[n] and integrity.is_stale(run.dir(n))]
    first = _first_to_run(names, {**states, **{n: None for n in run.stale}}, run.hashes, from_stage)
    _refuse_stale(run, names[first:], states, from_stage, names)
    if "prepare" not in names:  # a dataset given with --data: read by every stage
        integrity.verify(run.data, fix=run.fix("prepare"))
    for name in names[:first]:  # skipped because committed: what later stages read, so it must hold
        integrity.verify(run.dir(name), fix=run.fix(name))
    run.states = states
    return run, names, first, previous


def _run_stage(run: _Run, name: str, summary: RunManifest) -> None:
    """Run one stage and record it in the run manifest (RUN/manifest.json)."""
    t0 = time.perf_counter()
    log.info("%s: running", name)
    _clear_for_rerun(run, name, run.states[name])
    result = _STAGES[name](run)
    _swap_in(run, name)
    seconds = time.perf_counter() - t0
    summary.stages[name] = {"hash": run.hashes[name], "seconds": round(seconds, 2), "done_at": _now(), **result}
    summary.write(run.out)
    log.info("%s: committed in %.1f s", name, seconds)
    if os.environ.get(STOP_AFTER_ENV) == name:
        raise RuntimeError(f"stopped after stage {name} ({STOP_AFTER_ENV})")


# ------------------------------------------------------------------------------------------- run directory


def _check_run_dir(out: str, overwrite: bool) -> dict[str, Any]:
    """The previous run manifest of `out` ({} for a new run); refuses a directory that is not a run."""
    if not storage.exists(out) or not [n for n in storage.listdir(out) if n != runlock.LOCK]:
        return {}
    uri = storage.join(out, storage.MANIFEST)
    previous = storage.read_json(uri) if storage.exists(uri) else None
    if previous is not None and previous.get("kind") == "run":
        return previous
    if overwrite:
        return {}
    raise StorageError(
        f"{out} exists and is not a recdist run directory"
        + (f" (its manifest is a {previous.get('kind')!r})" if previous else ""),
        fix="choose another --out, or pass --overwrite to run the pipeline there anyway",
    )


def _remove_leftovers(run: _Run, skipped: list[str]) -> None:
    """What killed runs left in the run directory (we hold its lock, so no live run owns them): staging
    directories and temporary files, and the rebuilds (RUN/<stage>.next) of stages this run keeps."""
    leftovers = storage.remove_leftovers(run.out)
    for name in skipped:
        rebuild = run.committed_dir(name) + NEXT
        if name not in SELF_STAGED and storage.exists(rebuild):
            storage.remove(rebuild)
            leftovers.append(rebuild)
    for leftover in leftovers:
        log.info("removed %s, left by a run that was killed", leftover)


def _state(run: _Run, name: str) -> str | None:
    """The hash a stage's committed output was made with, or None when it is not committed (the outputs: no
    `_SUCCESS`, which outputs written before the folder-per-table layout lack: they are redone)."""
    where = run.dir(name)
    if not storage.is_committed(where, tables.SUCCESS if name == "outputs" else storage.MANIFEST):
        return None
    manifest = storage.read_json(storage.join(where, storage.MANIFEST))
    if name == "prepare":
        return manifest.get("config_hash")
    return manifest.get("stage_hash")


def _first_to_run(names: list[str], states: dict[str, str | None], hashes: dict[str, str], start: str | None) -> int:
    """The first stage to run: the --from stage, or the first not committed with this config's hash."""
    for i, name in enumerate(names):
        if name == start or states[name] != hashes[name]:
            return i
    return len(names)


def _refuse_stale(
    run: _Run, to_run: list[str], states: dict[str, str | None], from_stage: str | None, names: list[str]
) -> None:
    """A committed stage of another config is replaced only when asked (overwrite, or --from before it)."""
    if run.overwrite:
        return
    forced = set(names[names.index(from_stage) :]) if from_stage else set()
    stale = [n for n in to_run if states[n] is not None and states[n] != run.hashes[n] and n not in forced]
    if stale:
        raise StorageError(
            f"{run.out} holds stage(s) {', '.join(stale)} made with another config",
            fix="pass --overwrite to redo them with this config, --from "
            f"{stale[0]} to restart there, or choose another --out",
        )


def _clear_for_rerun(run: _Run, name: str, state: str | None) -> None:
    """Where the stage builds: a committed stage is kept (readable) until its rebuild is whole, which goes to
    RUN/<stage>.next (prepare and outputs stage themselves); an incomplete one, or an incomplete rebuild, is
    resumed when its intent.json shows this hash and removed otherwise."""
    if name in SELF_STAGED:
        return
    if state is not None:
        run.building[name] = run.committed_dir(name) + NEXT
    where = run.dir(name)
    intent_uri = storage.join(where, INTENT)
    intent = storage.read_json(intent_uri).get("stage_hash") if storage.exists(intent_uri) else None
    if storage.exists(where) and intent != run.hashes[name]:
        storage.remove(where)
    storage.write_json(intent_uri, {"stage_hash": run.hashes[name], "started_at": _now()})


def _swap_in(run: _Run, name: str) -> None:
    """Swap a rebuilt stage in whole (RUN/<stage>.next -> RUN/<stage>); the later committed stages, made from the
    one replaced, are now stale (their manifests pin the old one): kept, refused by readers until redone."""
    if name not in run.building:
        return
    storage.replace_dir(run.building.pop(name), run.committed_dir(name))
    later = [n for n in run.names[run.names.index(name) + 1 :] if storage.is_committed(run.committed_dir(n))]
    if later:
        log.info("%s: replaced; %s now stale until redone (kept, refused by readers)", name, ", ".join(later))


# ------------------------------------------------------------------------------------------------- stages


def _prepare(run: _Run) -> dict[str, Any]:
    from recdist.data.prepare import prepare

    # a committed dataset is replaced in one swap by prepare's staged_output, readable until then
    manifest = prepare(run.config, run.data, overwrite=run.states.get("prepare") is not None)
    return {"n_ratings": manifest["n_ratings"], "splits": manifest["splits"]}


def _mf(run: _Run) -> dict[str, Any]:
    """Stage 1: the full MF model, K fold models when cross-fitting, then mf_pred, error and the session
    context (stages 2 and 3 read it) for every row."""
    from recdist.infer.session import SessionSpec, SessionStep
    from recdist.train.sampling import write_fold_dataset

    cfg, where = run.config, run.dir("mf")
    model = _train(run, "mf", run.data, storage.join(where, "model"), warm=run.warm)  # fold models: cold
    folds, seed = cfg.pipeline.crossfit.folds, cfg.stages.mf.train.seed
    fold_models = []
    for k in range(folds):
        fold_data = storage.join(where, "folds", str(k), "data")
        if not storage.is_committed(fold_data):
            write_fold_dataset(run.data, fold_data, k, folds, seed)
        fold_out = storage.join(where, "folds", str(k), "model")
        fold_models.append(_train(run, "mf", fold_data, fold_out, label=f"fold {k}"))
    session = SessionStep(SessionSpec.of(cfg.pipeline.session))
    share = _share(run)
    delta = _delta(run, "mf", share) if run.plan is not None and run.plan.in_process else None  # Ray Data: all rows
    scoring = _score(run, "mf", model, run.data, "mf", fold_models=tuple(fold_models), features=(session,),
                     share=share, delta=delta)  # fmt: skip
    return _commit_stage(run, "mf", model, scoring, crossfit_folds=folds)


def _reliability(run: _Run) -> dict[str, Any]:
    """Stage 2: learn stage 1's squared error from its frozen factors; pred_error for every row."""
    return _mlp_stage(run, "reliability", upstream_stage="mf", share=_share(run))


def _rating(run: _Run) -> dict[str, Any]:
    """Stage 3: the rating from the frozen factors and the predicted error; pred_rating for every row."""
    return _mlp_stage(run, "rating", upstream_stage="reliability")


def _mlp_stage(run: _Run, name: str, *, upstream_stage: str, share: TrainShare | None = None) -> dict[str, Any]:
    """Stage 2 or 3: train on the upstream stage's scored table (or its share of training rows) with the frozen
    stage-1 model attached, then score every row (stage 1's biases as the cold-start fallback; with `share`,
    also the sample the next stage trains on)."""
    mf_model = storage.join(run.dir("mf"), "model")
    upstream = storage.join(run.dir(upstream_stage), "scored")
    out = storage.join(run.dir(name), "model")
    warm = _warm_after(run, name)
    model = _train(run, name, _training_rows(run, upstream), out, upstream=mf_model, warm=warm)
    delta = _delta(run, name, share) if run.plan is not None and run.plan.in_process else None  # Ray Data: every row
    scoring = _score(run, name, model, upstream, name, fallback_model=mf_model, share=share, delta=delta)
    return _commit_stage(run, name, model, scoring)


def _warm_after(run: _Run, name: str) -> WarmStart | None:
    """Stage `name`'s warm start, unless a stage before it was refit cold (its weights learnt on inputs that
    moved since: then cold too, said in the log)."""
    warm = run.warm_stages.get(name)
    if warm is None:
        return None
    for before in RNCF_STAGES[: RNCF_STAGES.index(name)]:
        if storage.read_json(storage.join(run.dir(before), "model", "metrics.json")).get("warm_fallback"):
            log.info("%s: starts cold: %s was refit cold, its outputs moved from the previous run's", name, before)
            return None
    return warm


def _share(run: _Run) -> TrainShare | None:
    """The TrainShare a stage-1/2 scoring pass writes beside its output for the next stage, or None (all rows)."""
    fraction = run.config.pipeline.train_share.fraction
    return TrainShare(fraction, run.config.prepare.seed) if fraction < 1 else None


def _training_rows(run: _Run, scored: str) -> str:
    """What stages 2 and 3 train on: the scored table, or its sample/ of a share of the training rows."""
    return storage.join(scored, SAMPLE) if _share(run) is not None else scored


def _single(run: _Run) -> dict[str, Any]:
    """One model on the ratings (kind: single); its predictions are final (pred_rating)."""
    model = _train(run, "single", run.data, storage.join(run.dir("single"), "model"))
    scoring = _score(run, "single", model, run.data, "rating")
    return _commit_stage(run, "single", model, scoring)


def _outputs(run: _Run) -> dict[str, Any]:
    """Analyst tables, metrics.json and the report, committed together."""
    from recdist.infer.outputs import ranking_settings, write_outputs
    from recdist.models.io import load_model
    from recdist.report import write_report

    cfg = run.config
    if cfg.pipeline.kind == "rncf":
        models = RunModels(
            data=run.data,
            scored=storage.join(run.dir("rating"), "scored"),
            final=storage.join(run.dir("rating"), "model"),
            mf=storage.join(run.dir("mf"), "model"),
            reliability=storage.join(run.dir("reliability"), "model"),
            histories={n: storage.join(run.dir(n), "model") for n in RNCF_STAGES},
        )
    else:
        final = storage.join(run.dir("single"), "model")
        models = RunModels(
            data=run.data,
            scored=storage.join(run.dir("single"), "scored"),
            final=final,
            mf=final if load_model(final).mf_tables() is not None else None,
            histories={"single": final},
        )
    stamp = run.stamp()
    figures.prefetch()  # the report's, during the tables
    with storage.staged_output(run.dir("outputs"), overwrite=True, marker=tables.SUCCESS) as tmp:
        metrics = write_outputs(
            models, tmp, cfg.pipeline, stamp, seed=cfg.prepare.seed, trained=run.trained(), carry=_carry(run)
        )
        metrics = drift.attach(tmp, metrics, run.out, cfg.pipeline.drift)  # pipeline.drift.against: unset = none
        with logs.timed(log, "outputs: report"):
            report = write_report(tmp, metrics, models, cfg, stamp)
        storage.write_bytes(storage.join(tmp, tables.SCHEMA_DOC), tables.data_dictionary().encode())
        shown = cfg.pipeline.outputs
        OutputsManifest(
            stage_hash=run.hashes["outputs"],
            models=models.relative_to(run.out),
            top_n=shown.top_n,
            candidates=shown.candidates,
            recommend_min_ratings=shown.recommend_min_ratings,
            ranking=ranking_settings(cfg.pipeline),
            similar_k=shown.similar_k,
            similar_min_ratings=shown.similar_min_ratings,
            report=report,
            files=file_entries(tmp),
            inputs=run.inputs("outputs"),
        ).write(tmp)
        storage.write_bytes(storage.join(tmp, tables.SUCCESS), b"")  # last: the outputs are whole
    return {"metrics": "outputs/metrics.json", "report": f"outputs/{report}"}


def _carry(run: _Run) -> Carry | None:
    """What a fold-in night's outputs take over from the warm start's run (recdist.infer.outputs.Carry), or None:
    a cold or plain warm run, a stage that was not part of the fold-in (trained, or refit cold), another output or
    ranking setting, or a dataset that did not keep the previous run's indices (each said in the log)."""
    from recdist.infer.outputs import CANDIDATE_MODEL, Carry, ranking_settings

    cfg = run.config
    if run.warm is None or not cfg.pipeline.warm.fold_in or cfg.pipeline.kind != "rncf":
        return None
    why = next((w for w in (run.folded_in(name) for name in RNCF_STAGES) if w), None)
    previous = drift.outputs_of(run.warm.run)
    if previous is None or not storage.exists(tables.table_dir(previous, "recommendations")):
        why = why or "it has no committed outputs with recommendations"
    else:
        before, shown = storage.read_json(storage.join(previous, storage.MANIFEST)), cfg.pipeline.outputs
        keys = ("top_n", "candidates", "recommend_min_ratings")
        now = (*(getattr(shown, k) for k in keys), ranking_settings(cfg.pipeline))
        if (*(before.get(k) for k in keys), before.get("ranking")) != now:
            why = why or "its output settings differ"
    if why:
        log.info("outputs: every user's recommendations ranked, none kept from %s: %s", run.warm.run, why)
        return None
    unchanged = run.unchanged()
    kept = storage.join(previous, CANDIDATE_MODEL)
    log.info("outputs: a fold-in night: %s users with nothing new keep %s's recommendations", f"{unchanged.sum():,}",
             run.warm.run)  # fmt: skip
    return Carry(previous, unchanged, kept if storage.exists(kept) else None)


def sections_differ(previous_run: str, config: Config, sections: Iterable[str]) -> str | None:
    """Which of the config `sections` the run `previous_run` was made with differ from `config`'s ("<section>
    differs"), or None when all are the same."""
    from recdist.config import load_config

    config_file = storage.join(previous_run, "config.yaml")
    if not storage.exists(config_file):
        return "its config.yaml is missing"
    before = load_config(config_file)
    return next((f"{s} differs" for s in sections if before.section_hash(s) != config.section_hash(s)), None)


def _delta(run: _Run, name: str, share: TrainShare | None) -> Delta | None:
    """Stage `name`'s pass (writing the sample `share`) on a fold-in night: a layer of the users whose predictions
    moved over the warm start's run's scored table of the same stage (recdist.infer.scored.Delta), or None (every
    row scored; why said in the log)."""
    from recdist.data.dataset import read_manifest
    from recdist.infer.scored import MAX_LAYERS, Delta, layer_files

    if run.warm is None or not run.config.pipeline.warm.fold_in:
        return None
    previous = storage.join(run.warm.run, name, "scored")
    why = run.folded_in(name) or (None if storage.is_committed(previous) else "it has no committed scored table")
    if run.config.pipeline.crossfit.folds and not why:  # the fold models' scores of training rows are new each night
        why = "stage 1's cross-fitted scores (its fold models train every night)"
    if not why:  # the columns of a user with nothing new: the sections of this stage and every one before it
        upto = RNCF_STAGES[: RNCF_STAGES.index(name) + 1]
        why = sections_differ(run.warm.run, run.config, [s for stage in upto for s in STAGE_SECTIONS[stage]])
    if not why:
        before = read_manifest(previous)
        sample = before.get("sample") or {}
        drawn = (sample.get("share"), sample.get("seed")) if sample else None
        if len(before.get("layers") or ()) >= MAX_LAYERS:
            why = f"its table has {MAX_LAYERS} layers: written whole tonight"
        elif drawn != ((share.share, share.seed) if share is not None else None):
            why = "its training sample was drawn with other settings"
        else:  # a file lost since (a damaged run): tonight's table cannot link it
            paths = layer_files(previous, share)[1]
            gone = next((p for p in paths if not storage.exists(storage.join(previous, p))), None)
            why = f"its file {gone} is gone" if gone else None
    if why:
        log.info("%s: every row scored, none taken from %s: %s", name, run.warm.run, why)
        return None
    users = run.moved()
    log.info("%s: scoring the ratings of the %s users whose predictions moved in this process, the other %s users' "
             "rows linked from %s's scores", name, f"{users.sum():,}", f"{(~users).sum():,}", run.warm.run)  # fmt: skip
    return Delta(previous, users)


_STAGES: dict[str, Callable[[_Run], dict[str, Any]]] = {
    "prepare": _prepare,
    "mf": _mf,
    "reliability": _reliability,
    "rating": _rating,
    "single": _single,
    "outputs": _outputs,
}


# ------------------------------------------------------------------------------------------------ helpers


def _train(
    run: _Run,
    stage: str,
    data: str,
    out: str,
    *,
    upstream: str | None = None,
    label: str = "",
    warm: WarmStart | None = None,
) -> str:
    """train_stage into `out` unless it is already committed (a resumed stage); returns `out`."""
    from recdist.train.run import train_stage, trained_line

    name = f"{stage} {label}" if label else stage
    if getattr(run.config.stages, stage).tune is not None and not label:  # re-tune first (kept once committed)
        from recdist.tune.search import tune_for_pipeline

        tuned = tune_for_pipeline(run.config, stage, data, storage.join(run.dir(stage), "tune"), upstream)
        setattr(run.config.stages, stage, tuned)  # the fold models and the stage manifest use it too
    if storage.is_committed(out):
        integrity.verify(out, fix=run.fix(stage))
        log.info("%s: model already trained, kept", name)
        return out
    section = run.config.stages.slot(stage)
    log.info("%s: training %s", name, section.model)
    metrics = train_stage(
        data, section, run.config.cluster, out, upstream=upstream, warm_start=warm.to_json() if warm else None,
        warm=run.config.pipeline.warm, epoch_lines=not label, splits=_final_splits(stage),
    )  # fmt: skip
    if metrics.get("epochs"):  # a warm stage that kept yesterday's weights has said so
        log.info("%s: %s", name, trained_line(metrics))
    return out


def _final_splits(stage: str) -> tuple[str, ...]:
    """The splits a stage's model measures when it is trained: stages 2 and 3 validation only, as the outputs stage
    measures every split of every stage from the scored tables (their train and test figures would be a second
    MLP pass over every rating, ~1.5 s each at 20M); stage 1's compiled kernel measures all three in a moment."""
    return () if stage in ("reliability", "rating") else SPLITS


def _score(run: _Run, stage: str, model: str, data: str, role: str, **options: Any) -> dict[str, Any]:
    """One inference pass into RUN/<stage>/scored unless already committed (a resumed stage), with the run's view
    of the training rows (read once) and its inference settings; options: more ScoreOptions. Ray Data scores it,
    or this process where the stages train in it (one worker on this machine: cluster.in_process)."""
    from recdist.infer.ray_data import score
    from recdist.infer.scored import ScoreOptions, score_local

    out = storage.join(run.dir(stage), "scored")
    if storage.is_committed(out):
        integrity.verify(out, fix=run.fix(stage))
        return ScoredManifest.read(out).scoring
    inference, cfg = run.config.pipeline.inference, run.config
    local = run.plan is not None and run.plan.in_process
    if not options.get("delta"):  # a Delta pass has said what it scores
        log.info("%s: scoring every rating %s", stage, "in this process" if local else "with Ray Data")
    opts = ScoreOptions(
        role=role,
        fold_seed=cfg.stages.mf.train.seed,
        trained=run.trained(),
        batch_size=inference.batch_size,
        actors=inference.actors,
        gpu=cfg.cluster.gpu,
        cluster=cfg.cluster,
        workers=run.plan.cpus_per_worker if local and run.plan else 1,
        **options,
    )
    result = (score_local if local else score)(model, data, out, opts)
    computed = f" ({result['computed']:,} computed, the rest linked)" if "computed" in result else ""
    log.info("%s: scored %s rows%s in %.1f s", stage, f"{result['rows']:,}", computed, result["seconds"])
    return result


def _commit_stage(run: _Run, name: str, model: str, scoring: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Write RUN/<stage>/manifest.json last: the stage now counts as done."""
    train_metrics = storage.read_json(storage.join(model, "metrics.json"))
    figures = {k: train_metrics.get(k) for k in ("train", "val", "test", "epochs", "best_epoch", "seconds")}
    warm = {k: train_metrics[k] for k in ("warm_start", "warm_fallback") if train_metrics.get(k)}
    result = {"train": figures, "scoring": scoring, **warm, **extra}
    where = run.dir(name)
    StageManifest(
        stage=name,
        stage_hash=run.hashes[name],
        config=run.config.stages.slot(name).model_dump(mode="json"),
        files=file_entries(where, [f"{sub}/{storage.MANIFEST}" for sub in ("model", "scored")]),
        inputs=run.inputs(name),
        **result,
    ).write(where)
    return result


def _check_single_model(config: Config) -> None:
    if config.pipeline.kind != "single":
        return
    from recdist.models import registry

    cls = registry.get(config.stages.single.model).module
    if cls.upstream or cls.target != "rating":
        raise ConfigError(
            f"model {config.stages.single.model!r} cannot run alone: it needs a stage-1 model or fits errors",
            fix="use pipeline.kind: rncf for reliability_mlp / rating_mlp, or choose a rating model for "
            "stages.single (e.g. mf_residual_mlp, biased_mf, ncf_mlp)",
        )


def new_run_id() -> str:
    """A run's id: its start time (UTC) and 6 random hex digits, e.g. 20261201T135601Z-3fa9c2."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
