"""The `recdist` command: each subcommand turns its flags into config overrides and calls one function.

Flags are shorthands for `--set section.key=value`; both go through the same typed config tree as the YAML
files, so the CLI, jobs/ and the Kubernetes ConfigMap cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import sys
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from recdist import logs
from recdist.config import INFER_BATCH_SIZE, Config, load_config, parse_override, to_yaml, tree_default
from recdist.errors import RecdistError

app = typer.Typer(
    name="recdist",
    help="Train collaborative-filtering recommenders (MF, neural CF, reliability-based RNCF) on MovieLens "
    "with Ray Train and PyTorch; prepare data and write results as Parquet.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config", "-c", help="YAML config file (local or s3://); repeat to merge several, later keys winning "
        "(e.g. a pipeline config, then a `recdist tune` best.yaml).", show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override any config key: --set stages.mf.train.epochs=5 (repeatable)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing committed output.")]
_LOGS = "Logs"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Warnings and errors only: no progress lines or bars.", rich_help_panel=_LOGS),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Ray's own logs too (Ray Train, Ray Data, the workers' output).", rich_help_panel=_LOGS
    ),
]
LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(
        "--log-format", help="text, or json: one JSON object per line for log collectors.", rich_help_panel=_LOGS
    ),
]


def _out(help: str) -> Any:
    """The annotation of a command's required --out/-o."""
    return Annotated[str, typer.Option("--out", "-o", help=help)]


_SHORTHANDS: dict[int, tuple[str, Any]] = {}
"""id(typer OptionInfo) -> (the config key the flag is a shorthand for, the OptionInfo: kept alive, so its id is
never reused). Filled each time a command's annotations are evaluated (typer, _shorthands)."""


def _key(kind: type, key: str, help: str, panel: str | None = None, *decls: str, shown: str | None = None) -> Any:
    """The annotation of a shorthand flag for the config key `key` (`kind | None`, default None: unset). Its help
    shows the tree's default (or `shown`), and `_shorthands` reads it back under `key`: a flag cannot name a key
    the tree lacks (KeyError at import) nor restate a default that drifted."""
    default = tree_default(key)
    if shown is None and default is not None:
        shown = f"{default:,}" if isinstance(default, int) and not isinstance(default, bool) else str(default)
    text = f"{help} \\[default: {shown}]." if shown is not None else f"{help}."
    info = typer.Option(*decls, help=text, rich_help_panel=panel, show_default=False)
    _SHORTHANDS[id(info)] = (key, info)
    return Annotated[kind | None, info]


def _shorthands(command: Any, values: dict[str, Any]) -> dict[str, Any]:
    """{config key: value} of a command's shorthand flags (_key), from its local `values` (the common ones, which
    _command takes, are in `RunOptions.flags`)."""
    hints = typing.get_type_hints(command, include_extras=True)
    return {
        _SHORTHANDS[id(meta)][0]: values[name]
        for name, hint in hints.items()
        if name in values
        for meta in getattr(hint, "__metadata__", ())
        if id(meta) in _SHORTHANDS
    }


_SOURCE, _COLUMNS, _PREP, _CLUSTER = "Source (exactly one of)", "Columns of your files", "Preparation", "Cluster"
DatasetOpt = _key(str, "source.dataset", "GroupLens release (see `recdist datasets`) or `synthetic`", _SOURCE)
PathOpt = _key(
    str, "source.path", "Your ratings: a CSV/TSV/.dat/Parquet file, a GroupLens zip or directory; local or s3://",
    _SOURCE,
)
TrainPathOpt = _key(str, "source.train_path", "Your own split: the training file (implies --split given)", _SOURCE)
ValPathOpt = _key(str, "source.val_path", "Your own split: an optional validation file", _SOURCE)
TestPathOpt = _key(str, "source.test_path", "Your own split: the test file", _SOURCE)
ItemsPathOpt = _key(str, "source.items_path", "Movies file (id, title, genres) for --path / --train-path", _SOURCE)
"""A source flag replaces the config file's source (_config): `--path mine.csv` over a config naming a dataset."""
WorkersOpt = _key(int, "cluster.workers", "Ray Train workers (infer: Ray Data scoring tasks at a time)", _CLUSTER)
GpuOpt = _key(bool, "cluster.gpu", "One GPU per worker", _CLUSTER, "--gpu/--cpu", shown="--cpu; infer: GPUs if any")
_NIGHTLY = "Nightly runs"
DriftAgainstOpt = _key(
    str, "pipeline.drift.against", "Drift against a run (local or s3://) or `auto` (the latest complete run beside "
    "--out): metrics.json's `drift` and a report table", _NIGHTLY, "--drift-against", shown="none",
)
KeepLastOpt = _key(int, "pipeline.retention.keep_last", "After a complete run, keep the newest N complete runs "
                   "beside it and delete older ones", _NIGHTLY, "--keep-last", shown="keep all")
AddressOpt = _key(str, "cluster.address", "Ray cluster address", _CLUSTER, shown="$RAY_ADDRESS or local")


def _given_split(values: dict[str, Any]) -> dict[str, Any]:
    """A command's shorthand flags, with split `given` when own split files are passed without --split."""
    flags = dict(values)
    if flags.get("prepare.split") is None and any(flags.get(k) for k in SOURCE_CHOICE[2:]):
        flags["prepare.split"] = "given"
    return flags


def _logs(quiet: bool, verbose: bool, log_format: LogFormat) -> None:
    """The one logging setup of this process (recdist.logs), from the common flags."""
    logs.setup(quiet=quiet, verbose=verbose, fmt=log_format.value)


SOURCE_CHOICE = ("source.dataset", "source.path", "source.train_path", "source.val_path", "source.test_path")
"""The keys that choose a run's one source; given on the command line, they replace the config file's source."""
SOURCE_FILES = (*SOURCE_CHOICE, "source.items_path")
"""What such a replacement clears (the column mapping and format stay the file's)."""


def _config(path: list[str] | None, sets: list[str] | None, flags: dict[str, Any]) -> Config:
    """The config file, then --set overrides, then explicit flags (flags win). `--set KEY=` sets KEY to null; a
    source given by flag or --set (--path, --dataset, --train-path, ...) replaces the file's source (SOURCE_FILES)
    rather than adding a second one."""
    parsed = [parse_override(s) for s in sets or []]
    overrides: dict[str, Any] = {k: v for k, v in parsed if v is not None}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    nulls = {k for k, v in parsed if v is None and k not in overrides}
    if overrides.keys() & set(SOURCE_CHOICE):
        nulls |= set(SOURCE_FILES) - overrides.keys()
    return load_config(path, overrides, nulls=sorted(nulls))


_GROUPS: dict[str, dict[str, tuple[Any, Any]]] = {
    "source": {
        "dataset": (DatasetOpt, None), "path": (PathOpt, None), "train_path": (TrainPathOpt, None),
        "val_path": (ValPathOpt, None), "test_path": (TestPathOpt, None), "items_path": (ItemsPathOpt, None),
    },
    "cluster": {"workers": (WorkersOpt, None), "gpu": (GpuOpt, None), "address": (AddressOpt, None)},
    "config": {"config": (ConfigOpt, None), "set_": (SetOpt, None), "overwrite": (OverwriteOpt, False)},
    "logs": {"quiet": (QuietOpt, False), "verbose": (VerboseOpt, False), "log_format": (LogFormatOpt, LogFormat.text)},
}
"""The flags several commands share, by group: _command adds them to a command's signature."""


@dataclass(frozen=True)
class RunOptions:
    """What a command's shared flags ask for: config files, --set overrides, --overwrite and cluster shorthands."""

    config: list[str] | None = None
    sets: list[str] | None = None
    overwrite: bool = False
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)
    """{config key: value} of the shared shorthand flags (source.*, cluster.*)."""

    def load(self, flags: dict[str, Any]) -> Config:
        """The config: files, then --set, then the shared flags and the command's own (_config, _given_split)."""
        return _config(self.config, self.sets, _given_split({**self.flags, **flags}))


def _command(*groups: str) -> Any:
    """Register a command whose signature gains the shared flags of `groups` (_GROUPS), after its own; the logs
    group sets logging up before the body runs, and the body gets the rest as `opts: RunOptions`."""

    def decorate(func: Any) -> Any:
        hints = typing.get_type_hints(func, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(func).parameters.values()]
        own = [p for p in own if p.name != "opts"]
        shared = {name: spec for group in groups for name, spec in _GROUPS[group].items()}
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, (a, d) in
                 shared.items()]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            common = {name: kwargs.pop(name) for name in shared}
            if "logs" in groups:
                _logs(common["quiet"], common["verbose"], common["log_format"])
            opts = RunOptions(common.get("config"), common.get("set_"), common.get("overwrite", False),
                              _shorthands(command, common))
            return func(opts=opts, **kwargs) if "opts" in hints else func(**kwargs)

        del command.__wrapped__  # typer reads the signature below, not the body's
        command.__signature__ = inspect.Signature([*own, *extra])
        command.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
        return app.command()(command)

    return decorate


def _version(show: bool) -> None:
    if show:
        from recdist import __version__

        out.print(f"recdist {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _common(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print recdist's version and exit.")
    ] = False,
) -> None:
    """Train collaborative-filtering recommenders (MF, neural CF, reliability-based RNCF) on MovieLens with Ray
    Train and PyTorch; prepare data and write results as Parquet."""


def _print_json(obj: Any) -> None:
    out.print_json(json.dumps(obj, default=str))


_SIZE, _MODEL = "Size (defaults: ml-20m's)", "Planted model"


@_command("config", "logs")
def synth(
    opts: RunOptions,
    out_dir: _out("Directory (or s3:// prefix) to write into."),
    users: _key(int, "synth.n_users", "Number of users", _SIZE) = None,
    items: _key(int, "synth.n_items", "Number of movies", _SIZE) = None,
    ratings: _key(int, "synth.n_ratings", "Number of ratings", _SIZE) = None,
    min_user_ratings: _key(int, "synth.min_user_ratings", "Ratings every user has at least", _SIZE) = None,
    rank: _key(int, "synth.rank", "Rank of the planted user x movie model", _MODEL) = None,
    noise: _key(float, "synth.noise", "Noise std before rounding to half stars", _MODEL) = None,
    popularity_skew: _key(
        float, "synth.popularity_skew", "Scales movies' log popularity: 0 flat, 1 ml-20m's long tail, >1 steeper", _SIZE
    ) = None,
    activity_skew: _key(
        float, "synth.activity_skew", "Log-normal spread of users' activity: 0 all alike, 1.38 ml-20m's", _SIZE
    ) = None,
    exposure: _key(
        float, "synth.exposure", "Missing not at random: how much taste picks what a user rates; 0 none", _MODEL
    ) = None,
    seed: _key(int, "synth.seed", "Seed: same seed and sizes, same bytes") = None,
) -> None:
    """Write synthetic MovieLens-20M-shaped ratings from a planted low-rank model.

    OUT gets ml-20m's own CSV format: ratings.csv (userId,movieId,rating,
    timestamp; half stars 0.5-5), movies.csv (movieId,title,genres), and
    synth.json with the figures of what was drawn. Users have heavy-tailed
    activity (at least 20 ratings each), movies long-tailed popularity, and no
    (user, movie) pair comes twice.

    Full size takes 15-35 s and 2 GiB of memory; for a quick try:
      recdist synth --out data/synth --users 1000 --items 2000 --ratings 100000
    Then prepare it like any ratings file:
      recdist prepare --path data/synth --out data/synth-ds
    """
    from recdist.data.synth import write_synthetic

    cfg = opts.load(_shorthands(synth, locals()))
    _print_json(write_synthetic(cfg.synth, out_dir, overwrite=opts.overwrite))


@app.command()
def datasets() -> None:
    """List the GroupLens MovieLens releases recdist knows: files, format, rating scale, size and checksum."""
    from rich import box

    from recdist.data.download import cache_root, release_url
    from recdist.data.registry import releases

    layout = {"csv": "CSV, header", "tsv": "tab-separated", "dat": "`::`-separated"}
    table = Table("name", "ratings", "scale", "zip", "ratings file", "md5", box=box.SIMPLE_HEAD)
    for r in releases():
        table.add_row(
            r.name,
            f"{r.n_ratings:,}" if r.n_ratings else "grows",
            f"{r.rating_scale[0]:g}-{r.rating_scale[1]:g}" + (" (halves)" if r.rating_step == 0.5 else ""),
            f"{r.size_mb:,} MB",
            f"{r.ratings_member} ({layout[r.format]})",
            r.md5 or "fetched from <zip>.md5",
        )
    Console(width=max(out.width, 150)).print(table)  # one line per release, even in a pipe (80 columns)
    example = releases()[3]
    out.print(
        f"Downloaded from {release_url(example).rsplit('/', 1)[0]}/<name>.zip ($RECDIST_GROUPLENS_URL) into "
        f"{cache_root()} ($RECDIST_CACHE). Offline, put the zip there, or pass --path FILE.",
        markup=False, highlight=False, soft_wrap=True,
    )


@_command("logs")
def download(
    dataset: Annotated[str, typer.Argument(help="Release name, e.g. ml-20m (see `recdist datasets`).")],
    cache_dir: Annotated[
        str | None, typer.Option(help="Cache directory \\[default: $RECDIST_CACHE or ~/.cache/recdist].")
    ] = None,
) -> None:
    """Download a GroupLens release into the cache and verify its checksum (resumes partial downloads)."""
    from recdist.data.download import fetch
    from recdist.data.registry import get_release

    path = fetch(get_release(dataset), cache_dir=cache_dir)
    out.print(str(path))


@_command("source", "config", "logs")
def prepare(
    opts: RunOptions,
    out_dir: _out("Dataset directory (or s3:// prefix) to write."),
    user_col: _key(str, "source.user_col", "User id column", _COLUMNS) = None,
    item_col: _key(str, "source.item_col", "Item id column", _COLUMNS) = None,
    rating_col: _key(str, "source.rating_col", "Rating column", _COLUMNS) = None,
    timestamp_col: _key(str, "source.timestamp_col", "Timestamp column, '' for none", _COLUMNS) = None,
    separator: _key(str, "source.separator", "Field separator", _COLUMNS, shown="by the file extension") = None,
    header: _key(
        bool, "source.has_header", "Whether a text file has a header line", _COLUMNS, "--header/--no-header",
        shown="csv yes, tsv/dat no",
    ) = None,
    duplicates: _key(str, "prepare.duplicates", "Repeated pairs: last | first | mean | error", _PREP) = None,
    min_user_ratings: _key(int, "prepare.min_user_ratings", "Drop users with fewer ratings", _PREP) = None,
    min_item_ratings: _key(int, "prepare.min_item_ratings", "Drop items with fewer ratings", _PREP) = None,
    top_items: _key(int, "prepare.top_items", "Keep only the N most-rated items", _PREP, shown="all") = None,
    split: _key(str, "prepare.split", "random | user | time | user_time | given", _PREP) = None,
    val_fraction: _key(float, "prepare.val_fraction", "Validation share", _PREP) = None,
    test_fraction: _key(float, "prepare.test_fraction", "Test share", _PREP) = None,
    holdout_k: _key(int, "prepare.holdout_k", "user_time: last k per user to test, k before to val", _PREP) = None,
    seed: _key(int, "prepare.seed", "Seed of splits and shards", _PREP) = None,
    shards: _key(int, "prepare.shards", "Number of balanced Parquet shards") = None,
    previous: _key(
        str, "prepare.previous", "A previous dataset of this source: keep its id indices and rating splits"
    ) = None,
) -> None:
    """Validate, de-duplicate, filter, index, split and shard ratings into a prepared dataset.

    OUT gets ratings/part-NNNNN.parquet, users.parquet, items.parquet and
    manifest.json, written last: a directory without it is not a dataset.
    Bad input stops with the file, line and value, and leaves nothing behind.

    Examples:
      recdist prepare --dataset ml-20m --out data/ml-20m
      recdist prepare --path ml-20m.zip --out data/ml-20m --split user_time
      recdist prepare --path s3://bucket/ratings.parquet --out data/mine \\
          --user-col uid --item-col iid --rating-col stars --timestamp-col ''
      recdist prepare --train-path train.csv --test-path test.csv --out data/given
      recdist prepare --path day2.csv --out data/day2 --previous data/day1
    """
    from recdist.data.prepare import prepare as run_prepare

    cfg = opts.load(_shorthands(prepare, locals()))
    _print_json(run_prepare(cfg, out_dir, overwrite=opts.overwrite))


DataOpt = Annotated[str, typer.Option("--data", "-d", help="Prepared dataset (or a scored stage output).")]
ModelOpt = Annotated[str | None, typer.Option(help="Registered model name (see `recdist models`).")]
UpstreamOpt = Annotated[str | None, typer.Option(help="Trained MF model directory, for the reliability/rating stages.")]
STAGE_SLOTS = ("mf", "reliability", "rating", "single")


def _stage_key(stage: str) -> str:
    """The config section `stages.<stage>` that train/tune work on, or a clear error for an unknown slot."""
    if stage not in STAGE_SLOTS:
        raise RecdistError(f"unknown stage {stage!r}", fix=f"use one of: {', '.join(STAGE_SLOTS)}")
    return f"stages.{stage}"


def _model_flags(opts: RunOptions, key: str, model: str | None) -> dict[str, Any]:
    """--model as config overrides of the stage section `key`: the model and its params (_params_for)."""
    if model is None:
        return {}
    return {f"{key}.model": model, f"{key}.params": _params_for(opts.config, opts.sets, key, model)}


def _verified(*given: str | None) -> None:
    """Check the committed directories a command reads (dataset, scored table, model) against their manifests
    before anything is read from them, as `recdist pipeline` does: a damaged one stops it with the file, the damage
    and how to rebuild it (recdist.integrity)."""
    from recdist import integrity

    for folder in given:
        if folder:
            integrity.verify_given(folder)


@_command("cluster", "config", "logs")
def train(
    opts: RunOptions,
    data: DataOpt,
    out_dir: _out("Run directory for the model and metrics."),
    model: ModelOpt = None,
    stage: Annotated[
        str, typer.Option(help="Which stages.<name> section of the config to train: mf, reliability, rating, single.")
    ] = "single",
    upstream: UpstreamOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs.")] = None,
    solver: Annotated[str | None, typer.Option(help="auto | sgd | als | gibbs | autograd.")] = None,
) -> None:
    """Train one model data-parallel on Ray Train; write model, history, learning curve and metrics.json."""
    from recdist.train.run import train_stage

    key = _stage_key(stage)
    flags: dict[str, Any] = {f"{key}.train.epochs": epochs, f"{key}.train.solver": solver}
    flags |= _model_flags(opts, key, model)
    cfg = opts.load(flags)
    _verified(data, upstream)
    metrics = train_stage(
        data, getattr(cfg.stages, stage), cfg.cluster, out_dir,
        upstream=upstream, overwrite=opts.overwrite,
    )
    _print_json(metrics)


_SEARCH = "Search"


@_command("cluster", "config", "logs")
def tune(
    opts: RunOptions,
    data: DataOpt,
    out_dir: _out("Directory (or s3:// prefix) for the search's outputs."),
    model: ModelOpt = None,
    stage: Annotated[
        str | None,
        typer.Option(
            help="Which stages.<name> section to tune: mf, reliability, rating, single \\[default: the slot whose "
            "default model is --model (biased_mf: mf), else single]."
        ),
    ] = None,
    upstream: UpstreamOpt = None,
    trials: Annotated[
        int | None,
        typer.Option(help="Most trials \\[default: 20; unlimited with --time-budget alone].", rich_help_panel=_SEARCH),
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option(help="Wall-clock budget in seconds.", rich_help_panel=_SEARCH)
    ] = None,
    space: Annotated[
        list[str] | None,
        typer.Option(
            help="Change the search space: KEY=VALUE with KEY params.<field> or train.<field> and VALUE "
            "'{loguniform: [lo, hi]}', '{uniform: ...}', '{int: ...}', '{logint: ...}', '[a, b, c]', a fixed "
            "value, or null (repeatable).",
            rich_help_panel=_SEARCH,
        ),
    ] = None,
    cpus_per_trial: Annotated[
        float | None,
        typer.Option(help="CPUs per trial (below 1 shares cores) \\[default: sized to the cluster].",
                     rich_help_panel=_SEARCH),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random search \\[default: 0].",
                                             rich_help_panel=_SEARCH)] = None,
) -> None:
    """Search a model's settings with Ray Tune (ASHA on validation RMSE), each trial a `recdist train` run.

    OUT gets trials.parquet (one row per trial), best.yaml (the best stage as
    a config fragment: `recdist pipeline --config PIPELINE.yaml --config
    OUT/best.yaml`), val_rmse.png and best/ (the best settings retrained, as
    `recdist train` writes a run). Running the same command again after a
    kill resumes the search.

    Examples:
      recdist tune --data data/mls --model biased_mf --out runs/tune-mf --trials 40
      recdist tune --config configs/ml-latest-small.yaml --stage mf --data data/mls --out runs/tune-mf \\
          --time-budget 600 --space params.rank='[64, 128, 256]'
    """
    from recdist.config import DEFAULT_MODELS, TuneBudget
    from recdist.tune.search import checked_space, tune_stage

    if stage is None:
        stage = next((slot for slot, name in DEFAULT_MODELS.items() if name == model), "single") if model else "mf"
    key = _stage_key(stage)
    flags: dict[str, Any] = {
        f"{key}.tune.trials": trials, f"{key}.tune.time_budget_s": time_budget,
        f"{key}.tune.cpus_per_trial": cpus_per_trial, f"{key}.tune.seed": seed,
    }
    flags |= _model_flags(opts, key, model)
    cfg = opts.load(flags)
    section = getattr(cfg.stages, stage)
    budget = section.tune or TuneBudget()
    trials_set = section.tune is not None and "trials" in section.tune.model_fields_set
    if time_budget is not None and trials is None and not trials_set:
        budget = budget.model_copy(update={"trials": None})
    if space:
        budget = budget.model_copy(update={"space": {**budget.space, **dict(parse_override(s) for s in space)}})
    checked_space(section, budget)  # a bad knob is refused before the inputs are read
    _verified(data, upstream)
    summary = tune_stage(
        data, section, cfg.cluster, out_dir, budget=budget, slot=stage, upstream=upstream, overwrite=opts.overwrite
    )
    _print_json(summary)


def _params_for(config: list[str] | None, sets: list[str] | None, key: str, model: str) -> dict[str, Any]:
    """The params of --model: the config file's for this stage when it names the same model, then every
    `--set <key>.params.NAME=VALUE` (a file's params for another model would not fit this one)."""
    section = load_config(config).model_dump()["stages"][key.split(".")[1]] if config else None
    params = dict(section["params"]) if section and section["model"] == model else {}
    prefix = f"{key}.params."
    for name, value in (parse_override(s) for s in sets or []):
        if name.startswith(prefix):
            params[name.removeprefix(prefix)] = value
    return params


@_command("source", "cluster", "config", "logs")
def pipeline(
    opts: RunOptions,
    out_dir: _out("Run directory (local or s3://)."),
    data: Annotated[str | None, typer.Option(help="An already prepared dataset to use.")] = None,
    from_stage: Annotated[
        str | None, typer.Option("--from", help="Force a restart at this stage: prepare, mf, reliability, rating, ...")
    ] = None,
    drift_against: DriftAgainstOpt = None,
    keep_last: KeepLastOpt = None,
    warm_start: Annotated[
        str | None,
        typer.Option(
            help="A previous run directory (local or s3://): stage 1 starts from its factors and biases, mapped by "
            "original ids."
        ),
    ] = None,
) -> None:
    """The main job: prepare -> stage 1 MF -> stage 2 reliability -> stage 3 rating -> outputs and report.

    Resumable: re-running skips stages whose config matches; `--from STAGE` redoes from there.
    A source flag (--path, --dataset, --train-path ...) replaces the config's source:
      recdist pipeline --config configs/ml20m-cpu.yaml --path my/ratings.csv --out runs/mine
    """
    from recdist import runs
    from recdist.pipeline import run_pipeline

    cfg = opts.load(_shorthands(pipeline, locals()))
    result = run_pipeline(
        cfg, out_dir, data=data, from_stage=from_stage, overwrite=opts.overwrite, warm_start=warm_start
    )
    _print_json(
        {
            "status": result["status"],
            "seconds": result["seconds"],
            "stages": {name: (stage or {}).get("seconds") for name, stage in result["stages"].items()},
            "report": result["report"],
            "log": result["log"],
        }
    )
    after = cfg.pipeline
    status = runs.after_run(out_dir, after.retention.keep_last, fail_on_drift=after.drift.fail)
    if status:
        raise typer.Exit(status)


@_command("cluster", "config", "logs")
def infer(
    opts: RunOptions,
    model_dir: Annotated[str, typer.Option("--model", "-m", help="A trained model directory (train output).")],
    data: Annotated[str, typer.Option("--data", "-d", help="Prepared dataset or scored table to score.")],
    out_dir: _out("Where to write the scored Parquet table."),
    batch_size: Annotated[
        int | None, typer.Option(help=f"Rows per batch \\[default: {INFER_BATCH_SIZE:,}].", show_default=False)
    ] = None,
) -> None:
    """Batch inference with Ray Data: Parquet in, Parquet out with the model's prediction columns added.

    A stage-1 model (role mf) also writes the session context stages 2 and 3 read (pipeline.session).
    """
    from recdist.infer.ray_data import score
    from recdist.infer.scored import ScoreOptions
    from recdist.infer.scoring import role_of
    from recdist.infer.session import SessionSpec, SessionStep
    from recdist.models.io import model_class

    cfg = opts.load({"pipeline.inference.batch_size": batch_size})
    _verified(model_dir, data)
    role = role_of(model_class(model_dir))
    session = (SessionStep(SessionSpec.of(cfg.pipeline.session)),) if role == "mf" else ()
    options = ScoreOptions(
        role=role,
        batch_size=cfg.pipeline.inference.batch_size,
        actors=cfg.pipeline.inference.actors if opts.flags.get("cluster.workers") is None else cfg.cluster.workers,
        cluster=cfg.cluster,
        # --gpu/--cpu as given; else a config's gpu: true, or None: GPUs where the cluster has them
        gpu=cfg.cluster.gpu if opts.flags.get("cluster.gpu") is not None else cfg.cluster.gpu or None,
        overwrite=opts.overwrite,
        features=session,
    )
    _print_json(score(model_dir, data, out_dir, options))


@app.command()
def recommend(
    run: Annotated[str, typer.Argument(help="A finished pipeline run directory.")],
    user: Annotated[int | None, typer.Option(help="Original user id.")] = None,
    ratings: Annotated[
        str | None, typer.Option(help="CSV/Parquet of a new user's ratings (movieId, rating) to fold in.")
    ] = None,
    n: Annotated[int, typer.Option("-n", help="How many movies.")] = 10,
) -> None:
    """Top-N unseen movies for a known user, or for a new user from a handful of ratings."""
    from recdist.infer.recommend import recommend as run_recommend

    if (user is None) == (ratings is None):
        raise RecdistError("give exactly one of --user ID or --ratings FILE")
    _print_frame(run_recommend(run, user_id=user, ratings=ratings, n=n))


@app.command()
def similar(
    run: Annotated[str, typer.Argument(help="A finished pipeline run directory.")],
    movie: Annotated[int, typer.Option(help="Original movie id.")],
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
) -> None:
    """The k movies nearest to a movie by cosine similarity of the learned factors."""
    from recdist.infer.recommend import similar as run_similar

    _print_frame(run_similar(run, movie, k=k))


@app.command()
def models() -> None:
    """List the registered models with their parameters and defaults."""
    from recdist.models import registry
    from recdist.train.solvers import SOLVERS, default_lr

    table = Table("model", "what", "params (defaults)", "target", "train.lr (when empty)")
    for name in registry.names():
        entry = registry.get(name)
        params = ", ".join(f"{k}={v.default!r}" for k, v in entry.config.model_fields.items())
        rates = {s: default_lr(entry.module, s) for s in SOLVERS[entry.module.solver_family]}
        shown = [f"{lr} ({s})" for s, lr in rates.items() if lr is not None]
        lr = shown[0].split()[0] if len(shown) == 1 else ", ".join(shown)
        table.add_row(name, entry.summary, params, entry.module.target, lr)
    out.print(table)


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    explain: Annotated[bool, typer.Option(help="List every key with its description.")] = False,
) -> None:
    """Print the resolved config (file + overrides) as YAML, or every key explained."""
    cfg = _config(config, set_, {})
    if not explain:
        out.print(to_yaml(cfg), end="", markup=False, highlight=False)
        return
    table = Table("key", "value", "description")
    for key, value, doc in _walk(cfg):
        table.add_row(key, json.dumps(value, default=str), doc)
    out.print(table)


def _walk(section: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    from pydantic import BaseModel

    rows = []
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows += _walk(value, key + ".")
        else:
            rows.append((key, value, " ".join((field.description or "").split())))
    return rows


def _print_frame(frame: Any) -> None:
    table = Table(*frame.columns)
    for row in frame.iter_rows():
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    out.print(table)


def _switches(command: Any) -> Any:
    """Show boolean flags as switches in --help: typer's rich help gives every flag a `<bool>` type column, as if
    it took a value (`--gpu <bool>`); an empty metavar leaves it blank, on every command and on --help itself."""
    for param in command.params:
        if getattr(param, "is_flag", False):  # an option (typer's own click: no isinstance with click's)
            param.metavar = ""
    made = command.get_help_option  # --help is made per context, after the params

    def help_option(ctx: Any) -> Any:
        option = made(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _switches(sub)
    return command


def main(argv: list[str] | None = None) -> None:
    """Entry point: user-facing errors print what/where/fix and exit 2, with no traceback."""
    from recdist.storage import prefer_jemalloc

    prefer_jemalloc()
    try:
        _switches(typer.main.get_command(app))(args=argv, prog_name="recdist")
    except RecdistError as e:
        if logs.settings().fmt == "json":  # a log collector reads stderr: the error as one JSON line too
            logging.getLogger("recdist").error(str(e))
        else:  # soft_wrap: paths and commands in the message stay whole lines, to copy or grep
            err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

