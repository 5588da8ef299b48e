"""One typed config tree for the CLI, jobs/ and the Kubernetes ConfigMap: YAML file, then overrides.

Every knob is a field with a docstring (shown by `recdist config --explain`). Unknown keys are errors that
name the key's full path and suggest the closest valid one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import typing
from collections.abc import Iterable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator, model_validator

from recdist.errors import ConfigError

log = logging.getLogger(__name__)


class Section(BaseModel):
    """Base of every config section: unknown keys rejected, field docstrings kept as descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class SourceConfig(Section):
    """Where the raw ratings come from: a GroupLens release, a file of yours, or synthetic data."""

    dataset: str | None = None
    """GroupLens release to download or take from the cache (ml-100k, ml-1m, ml-10m, ml-20m, ml-25m,
    ml-latest-small, ml-latest), or `synthetic` to generate ratings from the `synth` section."""
    path: str | None = None
    """A ratings file or GroupLens zip of your own (CSV/TSV/.dat/Parquet/.zip), local path or s3:// URI."""
    items_path: str | None = None
    """Optional movies file (id, title, genres) for a ratings file given by `path`."""
    format: Literal["auto", "csv", "tsv", "dat", "parquet"] = "auto"
    """File format of `path`; `auto` decides by extension."""
    separator: str | None = None
    """Field separator for text files; default from the format (`,` csv, tab tsv, `::` dat)."""
    has_header: bool | None = None
    """Whether a text file has a header line; default: csv yes, tsv and dat no."""
    user_col: str = "userId"
    """Name of the user id column (or its 0-based position as text, for header-less files)."""
    item_col: str = "movieId"
    """Name of the item id column."""
    rating_col: str = "rating"
    """Name of the rating column."""
    timestamp_col: str | None = "timestamp"
    """Name of the timestamp column (seconds since epoch); empty for sources without one."""
    train_path: str | None = None
    """With split `given`: the training ratings file (same format and columns as `path`)."""
    val_path: str | None = None
    """With split `given`: an optional validation ratings file."""
    test_path: str | None = None
    """With split `given`: the test ratings file."""
    rating_scale: tuple[float, float] | None = None
    """(min, max) valid ratings; default from the release, else (0.5, 5.0)."""
    cache_dir: str | None = None
    """Download cache; default $RECDIST_CACHE, else ~/.cache/recdist."""

    @field_validator("rating_scale")
    @classmethod
    def _finite_scale(cls, scale: tuple[float, float] | None) -> tuple[float, float] | None:
        """A scale holds finite ratings only: an infinite bound would let inf in and train NaN weights."""
        if scale is not None and not (math.isfinite(scale[0]) and math.isfinite(scale[1]) and scale[0] < scale[1]):
            raise ValueError(f"must be two finite numbers [min, max] with min < max, e.g. [0.5, 5], not {list(scale)}")
        return scale


class SynthConfig(Section):
    """Synthetic MovieLens-20M-shaped ratings from a planted low-rank model with noise."""

    n_users: int = Field(138_493, ge=1)
    """Number of users (ml-20m: 138,493)."""
    n_items: int = Field(26_744, ge=1)
    """Number of movies (ml-20m: 26,744)."""
    n_ratings: int = Field(20_000_263, ge=1)
    """Target number of ratings (ml-20m: 20,000,263); exact after de-duplication."""
    min_user_ratings: int = Field(20, ge=1)
    """Every user rates at least this many movies (ml-20m: 20)."""
    rank: int = Field(8, ge=1)
    """Rank of the planted user x item model."""
    noise: float = Field(0.7, ge=0)
    """Standard deviation of the Gaussian noise added before rounding to half stars."""
    popularity_skew: float = Field(1.0, ge=0)
    """Multiplies the movies' log popularity weights: 1 is ml-20m's long tail, 0 every movie equally likely to
    be met, above 1 a steeper head and a thinner tail."""
    activity_skew: float = Field(1.38, ge=0)
    """Log-normal spread of users' activity above min_user_ratings: 1.38 is ml-20m's (mean/median 2.6), 0
    gives every user the same count, 2 a heavier tail."""
    exposure: float = Field(0.0, ge=0)
    """Missing not at random: how strongly a user's taste picks what they rate (the log popularity of a movie
    for a taste group gains `exposure` x the group's standardised affinity for it, and the group's users share
    half their planted taste). 0: what a user rates does not depend on how they would rate it."""
    seed: int = 0
    """Seed: the same config writes the same bytes."""


class PrepareConfig(Section):
    """Validation, de-duplication, filtering, id encoding, splitting and sharding."""

    duplicates: Literal["last", "first", "mean", "error"] = "last"
    """Policy for repeated (user, item) pairs: keep the latest (by timestamp, then file order), the
    first, their mean, or fail."""
    min_user_ratings: int = Field(0, ge=0)
    """Drop users with fewer ratings (applied after the item filters)."""
    min_item_ratings: int = Field(0, ge=0)
    """Drop items with fewer ratings."""
    top_items: int | None = Field(None, ge=1)
    """Keep only the N most-rated items (one seed kept 500)."""
    split: Literal["random", "user", "time", "user_time", "given"] = "random"
    """random: seeded over all ratings; user: per-user stratified random; time: one global timestamp cut;
    user_time: each user's last ratings; given: separate files from source.train_path/test_path."""
    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of ratings (or of each user's ratings) for validation. With split `given` and no val file, this
    share of the training file (default 0.1, by the random split's seeded pair hash) is carved out for
    validation, so early stopping has something to watch; 0 keeps it all in train and training runs every epoch
    without early stopping (prepare and train say so)."""
    test_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of ratings (or of each user's ratings) for test."""
    holdout_k: int = Field(1, ge=1)
    """With split user_time: each user's last k ratings go to test, the k before them to validation."""
    shards: int = Field(8, ge=1)
    """Number of balanced Parquet shards (training ranks read shards r, r+W, ...)."""
    seed: int = 42
    """Seed for the random splits and the shard assignment."""
    previous: str | None = Field(None, exclude=True)
    """A previous dataset of the same source (local or s3://): its users and items keep their indices (new ones
    are appended, gone ones keep theirs with no ratings) and its ratings keep their split. Left out of the
    section dumps (so configs without it hash as before) and added to dataset_hash when set."""

    @model_validator(mode="after")
    def _fractions(self) -> PrepareConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class ClusterConfig(Section):
    """Where and how wide training runs."""

    address: str | None = None
    """Ray cluster address; default $RAY_ADDRESS, else a local cluster is started."""
    workers: int = Field(1, ge=1)
    """Number of Ray Train workers (data-parallel ranks)."""
    in_process: bool | None = None
    """Train a one-worker stage in this process instead of a Ray Train worker (no controller, worker process,
    imports or process group to start: 15-20 s per stage on 2 cores), and let the pipeline score in it too (no
    Ray Data), so a run that needs no Ray starts none. Empty: so with cluster.workers 1 on this one machine (the
    local cluster recdist starts, or a one-node Ray this process joined itself); a cluster at an address
    (KubeRay, `ray job submit`) keeps Ray Train, which places the worker where its resources are. Checkpoints
    persist as Ray Train's do (a killed run resumes from the latest); a failure is not retried in place
    (max_failures restarts Ray Train workers)."""
    gpu: bool = False
    """One GPU per worker (CUDA + NCCL); fails early where the cluster has none."""
    cpus_per_worker: int | None = Field(None, ge=1)
    """CPUs reserved per worker; default: the machine's CPUs divided among the workers."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints (local or s3://); default RUN/_ray."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts from the latest checkpoint before a run is declared failed."""
    checkpoint_every_epochs: int = Field(0, ge=0)
    """Checkpoint after every N-th epoch (0: by time only). The last epoch's state, with the best epoch's weights,
    is always checkpointed; epochs in between report nothing to Ray Train (their lines reach the log all the same).
    A restart resumes from the latest checkpoint and lands on the same metrics (every epoch's randomness is drawn
    from the seed, rank and epoch): the policy trades work redone after a failure for time per epoch."""
    checkpoint_every_seconds: float = Field(30.0, ge=0)
    """Also checkpoint after the first epoch that ends this many seconds after the latest checkpoint (0: by
    epochs only): long epochs are checkpointed each, short ones every T seconds."""


class GibbsConfig(Section):
    """Bayesian MF by Gibbs sampling (train.solver = gibbs; recdist.train.gibbs): one epoch is one sweep. After
    burn_in sweeps every thin-th sweep's sample is kept and the model is their average predictor, stored as a plain
    MF of width rank x samples, samples = (epochs - burn_in) / thin at most (early stopping may end sooner). The
    defaults hold on ml-latest-small and bench/family.py's synthetic data (README, Bayesian MF)."""

    rank: int = Field(10, ge=1)
    """Length of each sample's user and item factor vectors (the model's params.rank does not apply: its stored
    width is rank x samples)."""
    burn_in: int = Field(10, ge=0)
    """Sweeps whose samples are discarded (the chain leaves its random start)."""
    thin: int = Field(2, ge=1)
    """Keep every thin-th sweep's sample after burn-in: neighbouring sweeps are alike, so thinning saves width,
    memory and scoring time for little accuracy."""


class TrainConfig(Section):
    """How one model is trained."""

    epochs: int = Field(20, ge=0)
    """Maximum passes over the training ratings (0: none, the starting weights are evaluated and kept: a warm stage
    2 or 3 keeping yesterday's, pipeline.warm.mlp_epochs)."""
    batch_size: int = Field(8192, ge=1)
    """Ratings per optimiser step over all workers together (each rank takes its share), so 1 and N workers
    take the same steps per epoch on the same effective batch (autograd and torch-SGD solvers)."""
    lr: float | None = Field(None, gt=0)
    """Learning rate (peak, before the schedule); empty: the model's own default where it has one (see `recdist
    models`), else 0.005 for the autograd optimisers and 0.02 for per-rating SGD (ALS has none)."""
    optimizer: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    """Optimiser for the autograd solver."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (AdamW); models carry their own L2 on embeddings."""
    solver: Literal["auto", "autograd", "sgd", "als", "gibbs"] = "auto"
    """MF solvers: compiled per-rating SGD, ALS, Gibbs sampling (Bayesian MF), or autograd; `auto` picks sgd for
    MF models, autograd else."""
    gibbs: GibbsConfig = Field(default_factory=lambda: GibbsConfig())
    """The gibbs solver's settings (no learning rate, no reg: its priors' precisions are sampled)."""
    lr_schedule: Literal["constant", "cosine", "plateau"] = "cosine"
    """Learning-rate schedule over epochs."""
    patience: int = Field(3, ge=0)
    """Stop after this many epochs without validation RMSE improvement (0 = never)."""
    grad_clip: float | None = Field(5.0, gt=0)
    """Clip the global gradient norm (autograd solver); empty to disable."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    seed: int = 0
    """Base seed; rank r uses seed + r."""

    @model_validator(mode="after")
    def _samples(self) -> TrainConfig:
        if self.solver == "gibbs" and self.epochs <= self.gibbs.burn_in:
            raise ValueError(f"the gibbs solver keeps no sample: epochs ({self.epochs}) must exceed gibbs.burn_in "
                             f"({self.gibbs.burn_in})")  # fmt: skip
        return self


class TuneBudget(Section):
    """A hyperparameter search (`recdist tune`) run before a stage trains, on validation RMSE."""

    trials: int | None = Field(20, ge=1)
    """Most trials (settings tried); empty: as many as time_budget_s allows."""
    time_budget_s: float | None = Field(None, gt=0)
    """Wall-clock budget of the search in seconds (trials running when it ends are stopped); empty: none."""
    space: dict[str, Any] = {}
    """Changes to the model's default search space (`recdist tune --help`): KEY: {loguniform: [lo, hi]},
    {uniform: ...}, {int: ...}, {logint: ...}, [choices], a fixed value, or null to stop searching KEY."""
    grace_epochs: int = Field(3, ge=1)
    """ASHA: epochs every trial trains before it can be stopped for trailing the others."""
    cpus_per_trial: float | None = Field(None, gt=0)
    """CPUs of each trial's worker(s): below 1 shares a core (small machines); empty: sized to the cluster."""
    seed: int = 0
    """Seed of the random search."""


class StageConfig(Section):
    """One trained model: its registered name, its own config (params), and how to train it."""

    model: str
    """Registered model name (see `recdist models`)."""
    params: dict[str, Any] = {}
    """Fields of the model's config dataclass (validated against it)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Training settings for this stage."""
    tune: TuneBudget | None = None
    """Re-tune this stage (a search within this budget) before training it in the pipeline; off when empty."""

    @model_validator(mode="after")
    def _known_model(self) -> StageConfig:
        from recdist.models import registry  # lazy: config sits above models in the flow

        registry.validate(self.model, self.params)
        return self


DEFAULT_MODELS = {
    "mf": "biased_mf",
    "reliability": "reliability_mlp",
    "rating": "rating_mlp",
    "single": "mf_residual_mlp",
}
"""The model each stage slot trains when its section does not name one."""


class StagesConfig(Section):
    """The models of each pipeline stage."""

    @model_validator(mode="before")
    @classmethod
    def _default_models(cls, data: Any) -> Any:
        """A stage section without `model` (e.g. only `train.epochs` overridden) keeps its slot's default model."""
        if isinstance(data, dict):
            data = {
                slot: {"model": DEFAULT_MODELS[slot], **value}
                if slot in DEFAULT_MODELS and isinstance(value, dict) and "model" not in value
                else value
                for slot, value in data.items()
            }
        return data

    mf: StageConfig = Field(default_factory=lambda: StageConfig(model=DEFAULT_MODELS["mf"]))
    """Stage 1 of RNCF: matrix factorisation."""
    reliability: StageConfig = Field(default_factory=lambda: StageConfig(model=DEFAULT_MODELS["reliability"]))
    """Stage 2 of RNCF: predicts stage 1's squared error from its factors."""
    rating: StageConfig = Field(default_factory=lambda: StageConfig(model=DEFAULT_MODELS["rating"]))
    """Stage 3 of RNCF: predicts the rating from the factors and the predicted error."""
    single: StageConfig = Field(default_factory=lambda: StageConfig(model=DEFAULT_MODELS["single"]))
    """The model of a one-stage pipeline (pipeline.kind = single)."""

    def slot(self, name: str) -> StageConfig:
        """The stage section of a slot name (mf, reliability, rating, single)."""
        if name not in DEFAULT_MODELS:
            raise ConfigError(f"unknown stage {name!r}", fix=f"use one of: {', '.join(DEFAULT_MODELS)}")
        return getattr(self, name)


INFER_BATCH_SIZE = 262_144
"""Rows per batch in batch inference (pipeline.inference.batch_size, `recdist infer --batch-size`)."""


class CrossfitConfig(Section):
    """Cross-fitting of stage 1: which model's errors stages 2 and 3 learn from on training rows."""

    folds: int = Field(0, ge=0)
    """0: stage-1 errors on training rows are in-sample (as the paper); K >= 2: K-fold cross-fitted (each
    training row's mf_pred and error come from the one of K fold models that did not train on it)."""


class SessionConfig(Section):
    """The session context stage 1's inference writes for stages 2 and 3 (recdist/infer/session.py)."""

    windows: tuple[NonNegativeInt, NonNegativeInt] = (60, 600)
    """(short, long) windows in seconds: the residuals of the user's training ratings rated within them."""
    future: bool = False
    """False: a row's session holds ratings made at or before it only (causal, as a live system sees them);
    True: also those made up to a window after it (better on a random split; uses later ratings)."""


class TrainShareConfig(Section):
    """Which training rows stages 2 and 3 train on."""

    fraction: float = Field(1.0, gt=0, le=1)
    """Share of the training ratings stages 2 and 3 train on (a seeded hash sample of (user, movie) pairs, with
    every validation row for early stopping; every row is still scored and evaluated). 1 = all, as the paper;
    on CPUs a share trades a little accuracy for much time on ML-20M."""


class InferenceConfig(Section):
    """How fast batch inference runs (never what it computes: left out of the stage hashes)."""

    batch_size: int = Field(INFER_BATCH_SIZE, ge=1)
    """Rows per batch in batch inference."""
    actors: int | None = Field(None, ge=1)
    """Ray Data scoring tasks at a time; default one per GPU, else one per 4 CPUs of the cluster (at least 1)."""


class OutputsConfig(Section):
    """The analyst tables: recommendations, similar movies and the factor map."""

    top_n: int = Field(10, ge=1)
    """Recommendations per user."""
    candidates: int = Field(100, ge=1)
    """Movies per user that the candidate model (`rank_candidates`) proposes and the final stages re-rank
    (recommendations, ranking metrics): an MLP cannot score every (user, movie) pair of ML-20M."""
    rank_candidates: Literal["ease", "ials", "mf"] = "ease"
    """The model whose best unseen movies are the `candidates` (recommendations, the final ranking metrics):
    `ease` and `ials` model which movies a user rates (recdist/models/implicit.py, fitted on the training
    ratings when the outputs are written), `mf` is stage 1's predicted rating (a weak top-N ranker)."""
    rank_order: Literal["blend", "rating", "candidate"] = "blend"
    """Final order of the candidates: `blend` = P(rated) x P(rating >= relevance_threshold | predicted rating,
    predicted error), `rating` = the predicted rating, `candidate` = the candidate score alone."""
    ease_reg: float = Field(4.0, gt=0)
    """EASE's L2 weight as a multiple of the mean training ratings per recommendable movie (rank_candidates:
    ease); 4 ranked best over ml-latest-small and synthetic data together (bench/ranking.py)."""
    ease_max_items: int = Field(4000, ge=1)
    """EASE models at most this many movies, the most-rated recommendable ones (the others are never candidates):
    its fit inverts an (items x items) matrix, about a second at 2,000 movies and a minute at 8,000 on 2 cores."""
    ease_max_users: int = Field(25_000, ge=1)
    """EASE's item-item counts come from a seeded sample of at most this many users (every user is still
    scored from their own ratings): their cost grows with the square of each user's ratings."""
    recommend_min_ratings: int = Field(1, ge=1)
    """Movies with fewer training ratings are never recommended, to known or new users, nor ranked by the
    ranking metrics: an MF scores a movie rated once or twice by little more than its bias, so without a floor
    the rarest movies crowd the top of every list."""
    similar_k: int = Field(10, ge=1)
    """Similar movies per movie."""
    similar_min_ratings: int = Field(20, ge=1)
    """Movies with fewer training ratings are left out of similar_items and the factor PCA (their factors
    are mostly initial noise)."""
    map_items: int = Field(200, ge=2)
    """Most-rated movies drawn on the 2-D factor map."""


class EvaluationConfig(Section):
    """The test ranking metrics."""

    ranking_k: int = Field(10, ge=1)
    """Cut-off of the test ranking metrics (Precision, Recall, NDCG at k)."""
    relevance_threshold: float = 4.0
    """A test rating at or above this counts as relevant for the ranking metrics."""
    ranking_users: int = Field(0, ge=0)
    """Users sampled for the ranking metrics, those whose original ids hash lowest under the run's seed (the same
    people in every run and on every day); 0 = every user with a relevant test rating."""


class DriftConfig(Section):
    """Drift against the previous run: a `drift` section in outputs/metrics.json and a table in the report."""

    against: str | None = None
    """`auto` = the latest complete run beside this one (same parent), or a run directory (local or s3://);
    unset = no drift section. `recdist pipeline --drift-against RUN|auto` sets it."""
    max_top10_change: float | None = Field(0.5, ge=0, le=1)
    """Warn when more than this share of the users' top-10 changed (1 - mean overlap@10); null = never."""
    fail: bool = False
    """Exit non-zero (status 4) after a complete run whose drift crossed a threshold."""


class RetentionConfig(Section):
    """Old runs under the run's parent, deleted after a successful run."""

    keep_last: int | None = Field(None, ge=1)
    """Keep the newest N complete runs beside this one (this run included), delete older complete runs; never
    the run a warm start or the drift read, an incomplete run or one whose lock is live. Unset = keep all."""


class WarmConfig(Section):
    """How a stage that starts from the previous run's weights trains (`recdist pipeline --warm-start`): a short
    restart of its schedule at a lower peak (SGDR), ended by early stopping, and refit cold when it comes out
    worse than the previous run. In the hash of each stage that starts warm, in no other (a cold run hashes as
    before). bench/warm.py measures it (README, issue 16)."""

    lr_share: float | None = Field(0.25, gt=0, le=1)
    """A warm stage's peak learning rate as a share of the stage's own (train.lr, else its solver's default): the
    weights start at a minimum, which a cold peak throws them out of; the new users' and movies' rows still
    have to learn. Empty: the rate the previous model ended at (too low after a fully annealed previous run:
    the new rows barely move)."""
    epochs: int | None = Field(5, ge=1)
    """Most epochs of a warm stage 1 (its train.epochs, the learning-rate schedule spanning them), never more than
    the stage's own train.epochs; empty: the stage's own."""
    mlp_epochs: int | None = Field(0, ge=0)
    """Most epochs of a warm stage 2 or 3 (models on stage 1's frozen tables, with no weights of their own per user
    or movie: a day's new ratings barely move them), never more than the stage's own. 0: the previous weights as
    they are, on today's tables and standardisations (a fold-in: yesterday's standardisations), kept when their
    validation RMSE is within `tolerance` of the previous run's (refit cold otherwise, as any warm stage); empty: as
    `epochs`."""
    patience: int = Field(1, ge=0)
    """Early stopping of a warm stage (its train.patience): the previous weights start near a minimum, so the
    first epoch without a validation improvement ends it; a cold run's patience waits through the plateaus of a
    descent a warm run does not have (0 = never stop early)."""
    fold_in: bool = False
    """A warm stage 1 that trains only what changed (a fold-in): new users, users whose training ratings differ from
    the previous dataset's, and new movies, over their rows alone (2% of the rows on a 2% day); every other user's
    and movie's factors and bias stay the previous run's, and so does the global mean, so a rating of theirs is
    predicted exactly as the night before. Known movies then learn nothing from new ratings until a cold or plain
    warm run: what a fold-in trades for training a fiftieth of the rows (bench/foldin.py, README). Needs stage 1's
    solver sgd (per-row rates freeze the rest). false: every row of a warm stage 1 trains."""
    refresh_every: int | None = Field(7, ge=1)
    """With fold_in: every refresh_every-th night of a run of fold-ins starts warm without folding in (every row of
    stage 1 trains, the candidate model is refitted, every user's recommendations are ranked), so known movies
    catch up with their new ratings; counted back along the warm starts (each run's stage 1 says whether it
    folded in). 7: weekly for a nightly batch. Empty: fold in every night."""
    tolerance: float = 0.005
    """A warm stage whose validation RMSE is worse than the previous run's same stage by more than this share of
    the previous one (0.005: 0.5%; a share, as the stages' targets differ in scale: ratings, squared errors) is
    refit cold, said in the log and recorded as `warm_fallback` in its metrics and manifests. The validation sets
    of two days differ by the new day's ratings (bench/warm.py, stage 1: warm minus previous -0.05% and +0.28% on
    a 2% day). Negative: the warm stage must beat the previous run's by that share (tests force the refit so)."""


MOVED_KEYS: dict[str, str] = {
    "crossfit_folds": "crossfit.folds",
    "session_windows": "session.windows",
    "session_future": "session.future",
    "mlp_train_share": "train_share.fraction",
    "infer_batch_size": "inference.batch_size",
    "infer_actors": "inference.actors",
    "top_n": "outputs.top_n",
    "candidates": "outputs.candidates",
    "recommend_min_ratings": "outputs.recommend_min_ratings",
    "similar_k": "outputs.similar_k",
    "similar_min_ratings": "outputs.similar_min_ratings",
    "map_items": "outputs.map_items",
    "ranking_k": "evaluation.ranking_k",
    "relevance_threshold": "evaluation.relevance_threshold",
    "ranking_users": "evaluation.ranking_users",
}
"""The flat keys of `pipeline` before its sub-sections -> their new place under `pipeline`; still read."""
_warned: set[str] = set()


class PipelineConfig(Section):
    """The main job's shape and its analyst outputs, one sub-section per concern (each hashed on its own)."""

    kind: Literal["rncf", "single"] = "rncf"
    """rncf: the three-stage reliability pipeline; single: one model (stages.single) with the same outputs."""
    crossfit: CrossfitConfig = CrossfitConfig()  # pydantic copies a model default per instance
    """Stage 1's fold models (in stage 1's hash)."""
    session: SessionConfig = SessionConfig()
    """The session context stage 1's pass writes (in stage 1's hash)."""
    train_share: TrainShareConfig = TrainShareConfig()
    """The training rows of stages 2 and 3 (in stage 1's hash: stage 1's pass writes the sample)."""
    inference: InferenceConfig = InferenceConfig()
    """Batch inference speed settings (in no hash)."""
    outputs: OutputsConfig = OutputsConfig()
    """The analyst tables (in the outputs stage's hash)."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """The test ranking metrics (in the outputs stage's hash)."""
    drift: DriftConfig = DriftConfig()
    """Drift against the previous run (in no hash: it names another run)."""
    retention: RetentionConfig = RetentionConfig()
    """Old runs deleted after a successful run (in no hash)."""
    warm: WarmConfig = WarmConfig()
    """How stages started from the previous run (`--warm-start`) train (in the hash of those stages only)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """Old flat keys (MOVED_KEYS) move to their sub-section, with one warning per key and process."""
        if not isinstance(data, dict) or not any(k in MOVED_KEYS for k in data):
            return data
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
        for old in [k for k in data if k in MOVED_KEYS]:
            section, key = MOVED_KEYS[old].split(".")
            target = data.setdefault(section, {})
            if not isinstance(target, dict) or key in target:
                raise ValueError(f"pipeline.{old} is pipeline.{MOVED_KEYS[old]}: set only the new key")
            target[key] = data.pop(old)
            if old not in _warned:
                _warned.add(old)
                log.warning("config key pipeline.%s is now pipeline.%s; please rename it", old, MOVED_KEYS[old])
        return data


class Config(Section):
    """The whole recdist config tree."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)

    def section_hash(self, *paths: str) -> str:
        """A short stable hash of the named sections (e.g. 'source', 'prepare'): what decides reuse."""
        data = self.model_dump(mode="json")
        picked = {p: _get(data, p) for p in paths}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """The hash of the whole config: RUN/manifest.json's and the report's config_hash."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def dataset_hash(self) -> str:
        """The hash of what a prepared dataset is made from (its manifest's config_hash): the source and prepare
        sections, and synth for synthetic ratings."""
        synthetic = self.source.dataset == "synthetic"
        digest = self.section_hash(*(("source", "synth", "prepare") if synthetic else ("source", "prepare")))
        if self.prepare.previous:  # excluded from the dump: hashed here, so datasets without it hash as before
            digest = hashlib.sha256(f"{digest}|previous={self.prepare.previous}".encode()).hexdigest()[:16]
        return digest


def _get(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data


def tree_default(dotted: str) -> Any:
    """The default of a config key (e.g. 'prepare.seed'); KeyError naming the key when the tree has none."""
    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise KeyError(f"no config key {'.'.join(parts[: i + 1])!r}")
        if i == len(parts) - 1:
            return field.get_default(call_default_factory=True)
        model = _section_type(field.annotation)
    raise KeyError(dotted)


def _section_type(annotation: Any) -> type[BaseModel]:
    """The section model behind a field's annotation (`TuneBudget | None` -> TuneBudget)."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    raise KeyError(f"not a config section: {annotation!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b.c=value' -> ('a.b.c', parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE", fix="write e.g. --set stages.mf.train.epochs=5")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = data.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
        data = node
    data[keys[-1]] = value


def load_config(
    path: str | list[str] | None = None, overrides: dict[str, Any] | None = None, nulls: Iterable[str] = ()
) -> Config:
    """Read YAML configs (local or s3://; several merge in order, later keys winning, e.g. a pipeline config then
    a `recdist tune` best.yaml), set the dotted keys `nulls` to null (what `--set KEY=` means, or a source flag
    replacing the file's source), apply dotted overrides (None: not given), validate into the typed tree."""
    data: dict[str, Any] = {}
    where = "the command line (--set and flags)"
    paths = [path] if isinstance(path, str) else list(path or [])
    for one in paths:
        from recdist import storage

        try:
            part = yaml.safe_load(storage.read_bytes(one)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file is not valid YAML: {e}", where=one) from e
        if not isinstance(part, dict):
            raise ConfigError("config file must hold a mapping of sections", where=one)
        data = merge(data, part)
    if paths:
        where = " + ".join(paths)
    for key in nulls:
        _set(data, key, None)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key, value)
    return validate(data, where=where)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, mappings merged key by key (a new dict; neither input changes)."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def validate(data: dict[str, Any], where: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            "invalid config:\n" + _explain(e),
            where=where,
            fix="correct the key in the config file or its --set / flag (`recdist config --explain` lists them all)",
        ) from None


def _explain(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _suggest(loc)
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def _suggest(loc: str) -> str:
    parts = loc.split(".")
    model: type[BaseModel] | None = Config
    for part in parts[:-1]:
        field = model.model_fields.get(part) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return ""
    names = [*model.model_fields, *(MOVED_KEYS if model is PipelineConfig else ())]
    close = difflib.get_close_matches(parts[-1], names, n=1)
    if close and close[0] in MOVED_KEYS and model is PipelineConfig:
        return f" (did you mean {MOVED_KEYS[close[0]]!r}?)"
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(model.model_fields)})"


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
