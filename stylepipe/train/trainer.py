"""The training loop for the style transformer, with NaN and divergence guards.

One step: forward under autocast, perceptual losses (Gram in fp32), backward
(through GradScaler in fp16), per-group gradient norms, clipping by global norm,
optimiser and scheduler steps. Every number the guards need is written into one
small row tensor on the device; the host reads the rows only every
``check_every`` steps, in one transfer, and inspects them in order, so the first
bad step is exact without a host-device sync per step.

The trainer knows nothing of MLflow, Optuna or Prefect: it takes callbacks.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from stylepipe.config import Config, ConfigError, TrainConfig
from stylepipe.nets.losses import PerceptualLoss
from stylepipe.nets.transformer import TransformerNet
from stylepipe.train.callbacks import Callback, TrainState
from stylepipe.train.guards import RunGuard, TrainingHalted

# When GradScaler skips an overflowing fp16 step, the scheduler still steps: expected, not a bug.
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward_loss(
    model: TransformerNet, criterion: PerceptualLoss, images: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Stylise a batch and compute its losses: (output, total, content, style, style per layer, tv)."""
    output = model(images)
    terms = criterion(output, images)
    style = terms.style
    total = weights[0] * terms.content + weights[1] * style + weights[2] * terms.tv
    return output, total, terms.content, style, torch.stack(list(terms.style_by_layer.values())), terms.tv


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@functools.cache
def compiled_forward_loss(mode: str = "default"):
    """One compiled ``forward_loss`` per process and mode. Modules are inputs to it (their
    parameters are not baked in), so every trial of a study with the same shapes reuses the
    graph instead of compiling again."""
    return torch.compile(forward_loss, mode=mode)


def free_recorded_cuda_graphs() -> None:
    """Drop the CUDA graphs recorded for an earlier trial; the compiled code stays.

    A graph is recorded against its parameters' addresses, and each trial has a new
    network, so each trial records its own graphs. Without this the old ones would pile up
    (their memory, and torch's limit on re-recordings per function). Private torch API,
    used only when present.
    """
    from torch._inductor import cudagraph_trees

    reset = getattr(cudagraph_trees, "reset_cudagraph_trees", None)
    if reset is not None:
        reset()


def build_optimizer(
    tc: TrainConfig,
    params: list[torch.nn.Parameter],
    cuda: bool,
    lr_schedule: Callable[[int], float] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam or AdamW, and a linear warm-up of ``tc.warmup_steps`` steps to ``tc.lr`` (or
    ``lr_schedule``: step index -> multiplier of ``tc.lr``)."""
    optimizer_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    # fused kernels on CUDA, foreach elsewhere: no per-parameter Python loop.
    fast = {"fused": True} if cuda else {"foreach": True}
    optimizer = optimizer_cls(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, **fast)
    warmup = tc.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule or (lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
    )
    return optimizer, scheduler


def metric_columns(style_layers: list[str], group_names: list[str]) -> list[str]:
    """The values of one step's metric row, in the order ``Trainer.train_step`` stacks them."""
    return (
        ["loss/content", "loss/style", *(f"loss/style/{n}" for n in style_layers), "loss/tv", "loss/total"]
        + ["grad_norm/total", *(f"grad_norm/{g}" for g in group_names)]
        + ["clip/fraction", "param_norm", "finite/input", "finite/output"]
    )


@contextmanager
def matmul_precision(precision: str | None):
    """``torch.set_float32_matmul_precision`` inside (a process-wide setting), then put back."""
    previous = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but this machine has no CUDA device (use auto or cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name} but MPS is not available here (use auto or cpu)")
    return device


@dataclass
class TrainResult:
    model: TransformerNet
    steps: int
    metrics: list[dict[str, float]]
    seconds: float

    @property
    def final(self) -> dict[str, float]:
        return self.metrics[-1]


class Trainer:
    def __init__(
        self,
        config: Config,
        criterion: PerceptualLoss,
        batches: Iterable[torch.Tensor],
        model: TransformerNet | None = None,
        callbacks: Sequence[Callback] = (),
        device: torch.device | None = None,
        lr_schedule: Callable[[int], float] | None = None,  # default: train.warmup_steps' warm-up
    ):
        tc = self.train_config = config.train
        self.device = device or resolve_device(tc.device)
        self.steps = tc.steps
        self.callbacks = list(callbacks)
        self.batches: Iterator[torch.Tensor] = iter(batches)
        cuda = self.device.type == "cuda"

        # the model and the loss network, in the memory layout the convolutions like best
        self.memory_format = torch.channels_last if (cuda and tc.channels_last) else torch.preserve_format
        if model is None:
            torch.manual_seed(tc.seed)
            model = TransformerNet()
        self.model = model.to(self.device, memory_format=self.memory_format).train()
        self.criterion = criterion.to(self.device, memory_format=self.memory_format)
        groups = self.model.parameter_groups()
        self.group_names = list(groups)
        self.group_params = [groups[name] for name in self.group_names]
        self.params = [p for group in self.group_params for p in group]

        self.optimizer, self.scheduler = build_optimizer(tc, self.params, cuda, lr_schedule)

        # precision: autocast dtype, fp16's GradScaler, TF32 for fp32 matrix products on CUDA
        self.autocast_dtype = AUTOCAST_DTYPES[tc.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.matmul_precision = ("high" if tc.tf32 else "highest") if cuda else None

        # the forward pass and losses, compiled or not; weights as a tensor, not floats, so a
        # compiled graph is reused by every trial
        weights = (config.loss.content_weight, config.loss.style_weight, config.loss.tv_weight)
        self.loss_weights = torch.tensor(weights, dtype=torch.float32, device=self.device)
        self.forward_loss = compiled_forward_loss(tc.compile_mode) if tc.compile else forward_loss
        # CUDA graphs reuse their output buffers: each step must say that a new one begins.
        self.cuda_graphs = cuda and tc.compile and tc.compile_mode in CUDA_GRAPH_MODES
        if self.cuda_graphs:
            free_recorded_cuda_graphs()

        self.clip_norm = tc.clip_norm  # a recovery may tighten it
        self.columns = metric_columns(criterion.style_layers, self.group_names)
        self.guarded = config.guard.enabled  # off: skip the extra finiteness reductions
        self.guard = RunGuard(
            config.guard, tc.precision, tc.clip_norm, weights, criterion.style_layers, self.group_names
        )
        self.history: list[dict[str, float]] = []
        self.step = 0  # steps done and checked; fit() continues from here

    # ----------------------------------------------------------------- one step
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch: torch.Tensor) -> torch.Tensor:
        """One optimisation step; returns the metric row (``self.columns``), still on the device."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        images = batch.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div(255)
        images = images.contiguous(memory_format=self.memory_format)
        one = torch.ones((), device=self.device)
        input_finite = torch.isfinite(images).all() if self.guarded else one

        with self._autocast():
            output, total, content, style, style_by_layer, tv = self.forward_loss(
                self.model, self.criterion, images, self.loss_weights
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)

        group_norms, grad_norm, clipped = self.clip_gradients()
        self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        param_norm = get_total_norm(self.params, foreach=True) if self.guarded else one
        output_finite = torch.isfinite(output).all() if self.guarded else one

        values = [content, style, *style_by_layer.unbind(), tv, total, grad_norm, *group_norms]
        values += [clipped, param_norm, input_finite, output_finite]
        return torch.stack([v.detach().float() for v in values])

    def clip_gradients(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Gradient norms per parameter group and in total, before clipping, then clipping to
        ``clip_norm``: (group norms, total norm, 1.0 if clipped else 0.0), on the device."""
        group_norms = [
            get_total_norm([p.grad for p in group if p.grad is not None], foreach=True)
            for group in self.group_params
        ]
        grad_norm = get_total_norm(group_norms, foreach=True)
        clipped = torch.zeros((), device=self.device)
        if self.clip_norm is not None:
            clip_grads_with_norm_(self.params, self.clip_norm, grad_norm, foreach=True)
            clipped = (grad_norm > self.clip_norm).float()
        return group_norms, grad_norm, clipped

    # ----------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        with matmul_precision(self.matmul_precision):
            return self._fit()

    def _fit(self) -> TrainResult:
        state = TrainState(self.model, self.step, self.steps)
        for cb in self.callbacks:
            cb.on_train_start(state)
        if self.step == 0:
            self.guard.start(float(get_total_norm(self.params)))
        check_every = self.train_config.check_every
        pending: list[torch.Tensor] = []
        pending_lr: list[float] = []
        started = time.perf_counter()

        for step in range(self.step + 1, self.steps + 1):
            pending_lr.append(self.optimizer.param_groups[0]["lr"])
            pending.append(self.train_step(next(self.batches)))
            if len(pending) == check_every or step == self.steps:
                table = torch.stack(pending).cpu().tolist()  # the only host-device sync
                first = step - len(pending) + 1
                rows = [
                    {"step": first + i, "lr": lr, **dict(zip(self.columns, values, strict=True))}
                    for i, (values, lr) in enumerate(zip(table, pending_lr, strict=True))
                ]
                pending.clear()
                pending_lr.clear()
                self._inspect(rows)
                self.step = step
                for cb in self.callbacks:
                    cb.on_metrics([public(row) for row in rows])
                state.step = step
                for cb in self.callbacks:
                    cb.on_check(state)

        result = TrainResult(
            self.model, self.steps, [public(r) for r in self.history], time.perf_counter() - started
        )
        for cb in self.callbacks:
            cb.on_train_end(state)
        return result

    def _inspect(self, rows: list[dict[str, float]]) -> None:
        """Check rows in step order; on the first bad one, halt with an autopsy."""
        for index, row in enumerate(rows):
            trigger, where = self.guard.check(row)
            if trigger is not None:
                seen = rows[: index + 1]
                self.history.extend(seen)
                autopsy = self.guard.autopsy(self.history, where, trigger)
                for cb in self.callbacks:
                    cb.on_metrics([public(r) for r in seen])
                for cb in self.callbacks:
                    cb.on_halt(autopsy)
                raise TrainingHalted(autopsy)
        self.history.extend(rows)

    # ----------------------------------------------------------------- to stop and go on
    def state_dict(self) -> dict:
        """Everything needed to go on from ``self.step`` as if never stopped: model, optimizer,
        scheduler, GradScaler, clip norm, the guards' running state, the batches' position, the
        RNG states and the metric history. Plain tensors, numbers and lists."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "clip_norm": self.clip_norm,
            "guard": self.guard.state_dict(),
            "batches": self.batches.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.set_clip_norm(state["clip_norm"])
        self.guard.load_state_dict(state["guard"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.history = list(state["history"])

    def skip_batches(self, count: int) -> None:
        """Draw and drop the next ``count`` batches (a recovery skips the data before a spike)."""
        for _ in range(count):
            next(self.batches)

    def set_lr(self, lr: float) -> None:
        """The schedule's peak learning rate from now on (the warm-up still scales it)."""
        factor = lr / self.scheduler.base_lrs[0]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]

    def set_clip_norm(self, clip_norm: float | None) -> None:
        self.clip_norm = self.guard.clip_norm = clip_norm


def public(row: dict[str, float]) -> dict[str, float]:
    """A metric row without the guards' internal 1/0 finiteness flags."""
    return {k: v for k, v in row.items() if not k.startswith("finite/")}
