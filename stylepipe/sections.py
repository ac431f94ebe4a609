"""The settings' sections, one pydantic model each: every key, its default, its bounds and
what it means. ``config.Config`` puts them together and reads them from YAML files and
``--set`` overrides.

Every section forbids unknown keys, so a typo is refused with the key and the file named
instead of being silently ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from stylepipe.stores import StoreUrl

# The VGG16 ReLU outputs the losses can use, shallow to deep (nets/vgg.py knows where they are).
LAYER_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


def _plain_name(name: str | None) -> str | None:
    """Names end up in MLflow filter strings, file names and Prefect deployments."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ValueError("use letters, digits, '.', '_' and '-' (up to 100, a letter or digit first)")
    return name


PlainName = Annotated[str, AfterValidator(_plain_name)]


def _is_number(annotation: Any) -> bool:
    """int, float, or either of them or None."""
    members = set(get_args(annotation)) - {type(None)} if get_args(annotation) else {annotation}
    return bool(members) and members <= {int, float}


class Section(BaseModel):
    # Infinity and NaN are never a setting (train.lr=.inf would train on NaN from step 1).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's ``true`` is not the number 1 (train.steps=true would train one step)."""
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not true or false")
        return value


class DataConfig(Section):
    # "skimage" (scikit-image's bundled photos), a folder of images, or a folder written
    # by ``stylepipe prepare`` (manifest.parquet + shard.npy), which training then reads.
    content: str = "skimage"
    # A path, "skimage:NAME", or "generated:NAME" (a procedural image made here).
    style_image: str = "generated:strokes"
    image_size: int = Field(64, ge=16, le=4096)
    style_size: int | None = Field(None, ge=16, le=4096)
    # Whether a study puts its prepared shard and a style image file into its MLflow run, for
    # workers that share no disk with this machine (they fetch them by hash: data/travel.py).
    # "auto": when tracking goes to a server, the one store every machine reaches; "never":
    # every worker needs the folder on a disk it mounts. true/false read as always/never.
    publish: Literal["auto", "always", "never"] = "auto"

    @field_validator("publish", mode="before")
    @classmethod
    def _yes_or_no(cls, value: Any) -> Any:
        return {True: "always", False: "never"}.get(value, value) if isinstance(value, bool) else value


class PrepareConfig(Section):
    """Thresholds of the preparation stage; every outlier check is a named reason."""

    image_size: int = Field(256, ge=8, le=4096)  # side of the square training images
    max_pixels: int = Field(89_478_485, ge=1)  # larger images are decompression bombs
    min_size: int = Field(64, ge=1)  # shorter side below this: too_small
    max_aspect: float = Field(3.0, ge=1)  # long side / short side above this: extreme_aspect
    near_constant_std: float = Field(2.0, ge=0)  # luminance std below this: near_constant
    dark_level: int = Field(16, ge=0, le=255)  # luminance below this counts as near-black
    bright_level: int = Field(240, ge=0, le=255)  # luminance above this counts as near-white
    mostly_fraction: float = Field(0.9, gt=0, le=1)  # share of near-black/white pixels: mostly_*
    min_contrast: float = Field(32.0, ge=0)  # luminance p99 - p01 below this: low_contrast
    min_sharpness: float = Field(20.0, ge=0)  # variance of the Laplacian below this: blurry
    near_duplicate_distance: int = Field(4, ge=0, le=32)  # perceptual-hash Hamming distance
    outlier_z: float = Field(8.0, gt=0)  # robust z-score (median/MAD) above this: statistical_outlier
    outlier_min_images: int = Field(20, ge=3)  # the whole-set statistics need this many images
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this colour
    val_fraction: float = Field(0.1, ge=0, lt=1)
    workers: int = Field(0, ge=0)  # 0: this process's share of the cores (stylepipe/ops/cores.py)


class LossConfig(Section):
    # "imagenet" (torchvision's cache), "random" (seeded; tests the pipeline only),
    # or a path to a local VGG16 state_dict (.pth/.pt loaded with weights_only, or .safetensors).
    vgg_weights: str = "random"
    content_layers: list[str] = ["relu2_2"]
    style_layers: list[str] = list(LAYER_NAMES)
    content_weight: float = Field(1.0, ge=0)
    style_weight: float = Field(1e5, ge=0)
    tv_weight: float = Field(1e-6, ge=0)
    # "fp32" always computes the Gram matrix in float32. "autocast" lets it follow the
    # autocast dtype: the common mistake that overflows in fp16. Kept for reproductions.
    gram_precision: Literal["fp32", "autocast"] = "fp32"

    @field_validator("content_layers", "style_layers")
    @classmethod
    def _known_layers(cls, layers: list[str]) -> list[str]:
        unknown = [name for name in layers if name not in LAYER_NAMES]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; choose from {list(LAYER_NAMES)}")
        if not layers:
            raise ValueError("at least one layer is needed")
        return layers


class TrainConfig(Section):
    steps: int = Field(200, ge=1)
    batch_size: int = Field(4, ge=1)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    clip_norm: float | None = Field(None, gt=0)  # None: no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # torch.compile of the forward pass and the losses (their backward follows), compiled once
    # per process and reused by every trial with the same shapes. "reduce-overhead" and
    # "max-autotune" also replay that compiled forward and backward as CUDA graphs (a few
    # launches, not hundreds; the optimiser step stays outside), recorded afresh per trial.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    channels_last: bool = True  # applied on CUDA only
    # CUDA: fp32 matrix products (the Gram matrices, forward and backward) on TF32 tensor
    # cores while training and its evaluations run. TF32 keeps fp32's exponent range, so the
    # Gram cannot overflow as an fp16 one does. Under bf16/fp16 autocast the forward Gram's
    # inputs carry at most 10 mantissa bits, which TF32 holds exactly; the backward's fp32
    # gradients and precision=fp32 runs are rounded to TF32, as cuDNN already does for fp32
    # convolutions by default. Champion promotion re-scores both models at full fp32.
    tf32: bool = True
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    # Finiteness is decided on the device every step but read by the host only
    # every check_every steps; the first bad step is still exact.
    check_every: int = Field(10, ge=1)
    seed: int = 0
    # Long runs (stylepipe train, the final model; never search trials or replays) write a good
    # checkpoint at the first check at or after every checkpoint_every steps (and, when
    # checkpoint_minutes is set, at the first check that many minutes after the last one: a
    # slow step or a big model loses at most that much work), keep the newest
    # keep_checkpoints, resume from them, and recover from a halt (the recovery section).
    checkpoint_every: int = Field(500, ge=1)
    checkpoint_minutes: float | None = Field(None, gt=0)
    keep_checkpoints: int = Field(3, ge=1)
    recovery: bool = True

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError("expected auto, cpu, mps, cuda or cuda:N")
        return device


class GuardConfig(Section):
    enabled: bool = True
    divergence_factor: float = Field(20.0, gt=1)  # loss above factor x running minimum
    divergence_warmup: int = Field(20, ge=0)  # steps before divergence checks start
    grad_spike_factor: float = Field(1000.0, gt=1)  # grad norm above factor x running median
    grad_spike_window: int = Field(50, ge=3)
    imbalance_ratio: float = Field(1e6, gt=1)  # weighted loss terms this far apart
    max_fp16_skips: int = Field(20, ge=1)  # consecutive GradScaler skips before giving up


class RecoveryConfig(Section):
    """What a long run does when a guard halts it (with train.recovery): go back to a good
    checkpoint (one further back each attempt), skip the batches up to the bad step, and go on
    with the learning rate and clip norm times these factors (compounded per attempt)."""

    max_attempts: int = Field(3, ge=1)
    lr_factor: float = Field(0.5, gt=0, lt=1)
    # None keeps the clip norm. With clipping off, a recovery turns it on at this factor times
    # the median gradient norm of the last good steps.
    clip_factor: float | None = Field(0.5, gt=0, le=1)


class SearchSpace(Section):
    """Ranges the sampler draws from: on a log scale, except ``beta1``'s, which is linear."""

    lr: tuple[float, float] = (1e-4, 1e-1)
    clip_norm: tuple[float, float] | None = (0.1, 100.0)  # None: never clip
    allow_no_clip: bool = True  # "off" is one more choice beside the range
    content_weight: tuple[float, float] = (0.3, 3.0)
    style_weight: tuple[float, float] = (1e4, 1e6)
    tv_weight: tuple[float, float] = (1e-7, 1e-4)
    beta1: tuple[float, float] | None = None  # e.g. [0.5, 0.95]; None keeps train.betas
    precision: list[Literal["fp32", "bf16", "fp16"]] | None = None  # None keeps train.precision

    @field_validator("lr", "clip_norm", "content_weight", "style_weight", "tv_weight", "beta1")
    @classmethod
    def _positive_ordered(cls, pair: tuple[float, float] | None) -> tuple[float, float] | None:
        if pair is not None and not (0 < pair[0] <= pair[1]):
            raise ValueError(f"expected 0 < low <= high, got {list(pair)}")
        return pair


class SearchConfig(Section):
    study_name: PlainName | None = None  # default: the config's name
    # default: $STYLEPIPE_SEARCH_STORAGE, else sqlite:///<run_dir>/optuna.db; a PostgreSQL URL works too
    storage: StoreUrl("search.storage") | None = None
    n_trials: int = Field(12, ge=1)  # total finished trials the study should hold
    seed: int = 0
    # Trials TPE samples at random before it models the results (Optuna's default is 10). It reads
    # every trial's stability (a constraint), so fewer random trials waste fewer on what breaks.
    startup_trials: int = Field(4, ge=0)
    # The stability edges (search/edge.py): before a new study's first trial, for each clipping
    # mode its trials train in, a bisection over log-lr of edge_probes runs trained as trials train
    # (from initialisation, the config's warm-up, a constant lr), each for a trial's length but at
    # most edge_steps steps past the warm-up. The lowest lr that broke is the mode's edge; trials
    # sample lr up to the edge of their own mode / edge_margin. edge_steps 0: no edges.
    # edge_margin None: the edges are found and reported but do not bound the search.
    edge_steps: int = Field(100, ge=0)
    edge_probes: int = Field(6, ge=2, le=20)
    edge_margin: float | None = Field(2.0, gt=1)
    # Each trial tells TPE whether it stayed finite (an Optuna 5 constraint: broken trials rank
    # below every finite one). False: it does not, as stylepipe searched before (comparisons).
    constraints: bool = True
    space: SearchSpace = SearchSpace()
    eval_every: int = Field(10, ge=1)  # steps between validation-quality reports
    val_batch_size: int = Field(8, ge=1)
    max_val_images: int = Field(64, ge=1)
    # Quality uses these fixed weights for every trial, never the trial's own.
    reference_content_weight: float = Field(1.0, gt=0)
    reference_style_weight: float = Field(1e5, gt=0)
    pruner_startup_trials: int = Field(4, ge=0)
    pruner_warmup_steps: int = Field(20, ge=0)
    # Heartbeats (RDB storage): a worker silent this long has its trial failed and retried.
    heartbeat_interval: int = Field(15, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(60, ge=2)  # seconds without a heartbeat before a trial is stale
    max_retry: int = Field(2, ge=0)  # times a stale trial is re-run by another worker
    workers_per_device: int = Field(1, ge=1)  # trials at once on one GPU (small batches)
    # Fan-out of the scheduled flow: it starts workers - 1 search_worker flow runs on its own work
    # pool, which share the study's trials and its certificate's replays (a PostgreSQL study).
    workers: int = Field(1, ge=1)
    top_k: int = Field(
        3, ge=1
    )  # candidates replayed under stress (and the baseline, the config's own settings)
    # steps of each stress replay; None: the final model's length, at most 4 x train.steps
    confirm_steps: int | None = Field(None, ge=1)
    replay_seeds: int = Field(2, ge=0)  # more seeds per candidate
    lr_margin: float = Field(2.0, ge=1.0)  # and once with lr x margin
    # Replay every candidate in full; by default they are certified best-first, each stopping
    # at its first failed replay, and none after the first that passes (the baseline always).
    certify_all: bool = False

    @field_validator("edge_steps")
    @classmethod
    def _ramp_long_enough(cls, steps: int) -> int:
        if 0 < steps < 10:
            raise ValueError("an edge test needs at least 10 steps (0 turns it off)")
        return steps


class TrackingConfig(Section):
    uri: StoreUrl("tracking.uri") | None = (
        None  # default: $STYLEPIPE_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    )
    experiment: str | None = None  # default: the study name
    registered_model: str = "stylepipe-style"
    # Per-step metric rows sent to MLflow: one in this many (plus step 1, the last step, the
    # step a guard halted at and any row with a non-finite value). Every row costs the
    # tracking store ~60 us of Python per metric.
    log_every: int = Field(10, ge=1)


class FinalConfig(Section):
    """The final model: the safest configuration trained once more, longer, and registered."""

    train: bool = True  # False: a study ends with its safest configuration and no model
    steps: int | None = Field(None, ge=1)  # default: train.steps
    # Its image size (at most the prepared shard's); trials and replays train at
    # data.image_size. Default: data.image_size.
    image_size: int | None = Field(None, ge=16)
    # Its good checkpoints are copied to its MLflow run as well, so that a retry on another
    # machine (a work pool, no shared disk) resumes it instead of starting over.
    mirror_checkpoints: bool = True
    # MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on its run,
    # sampled this often while it trains; None: not recorded. (Their cost: bench/RESULTS.md.)
    system_metrics_every_s: float | None = Field(10.0, gt=0)
    # Train the best candidate's final while the certificate's replays run on the other workers
    # (speculative.py); stopped, never registered, if the certificate picks another.
    # None: when search.workers > 1. Needs mirror_checkpoints (the finisher finishes it).
    speculative: bool | None = None
    # The photo it is shown on: triptych.png in its run folder (content | style | result)
    showcase_image: str = "skimage:astronaut"
    showcase_size: int = Field(256, ge=16)  # its longer side, in pixels


class ScheduleConfig(Section):
    """The Prefect deployment that runs the pipeline on a schedule."""

    deployment: str = "scheduled"
    cron: str | None = "0 3 * * *"  # every night at 03:00; None: run only when asked
    timezone: str = "UTC"
