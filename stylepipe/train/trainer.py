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
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from stylepipe.config import Config
from stylepipe.nets.losses import PerceptualLoss
from stylepipe.nets.transformer import TransformerNet
from stylepipe.train.callbacks import Callback
from stylepipe.train.guards import (
    Autopsy,
    DivergenceMonitor,
    Evidence,
    TrainingHalted,
    classify_cause,
)

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


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA device is available")
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
    ):
        tc = self.train_config = config.train
        self.guard_config = config.guard
        self.device = device or resolve_device(tc.device)
        self.steps = tc.steps
        self.callbacks = list(callbacks)
        self.batches: Iterator[torch.Tensor] = iter(batches)
        self.weights = (config.loss.content_weight, config.loss.style_weight, config.loss.tv_weight)

        cuda = self.device.type == "cuda"
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

        optimizer_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        # fused kernels on CUDA, foreach elsewhere: no per-parameter Python loop.
        fast = {"fused": True} if cuda else {"foreach": True}
        self.optimizer = optimizer_cls(
            self.params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, **fast
        )
        warmup = tc.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0
        )
        self.autocast_dtype = AUTOCAST_DTYPES[tc.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        # Weights as a tensor, not floats: a compiled graph is then reused by every trial.
        self.loss_weights = torch.tensor(self.weights, dtype=torch.float32, device=self.device)
        self.forward_loss = compiled_forward_loss(tc.compile_mode) if tc.compile else forward_loss
        # CUDA graphs reuse their output buffers: each step must say that a new one begins.
        self.cuda_graphs = cuda and tc.compile and tc.compile_mode in CUDA_GRAPH_MODES
        if self.cuda_graphs:
            free_recorded_cuda_graphs()
        # Applied while fit() runs (it is a process-wide setting), then put back.
        self.matmul_precision = ("high" if tc.tf32 else "highest") if cuda else None

        layers = criterion.style_layers
        self.columns = (
            ["loss/content", "loss/style", *(f"loss/style/{n}" for n in layers), "loss/tv", "loss/total"]
            + ["grad_norm/total", *(f"grad_norm/{g}" for g in self.group_names)]
            + ["clip/fraction", "param_norm", "finite/input", "finite/output"]
        )
        # Where a step can first go non-finite, in data-flow order (see guards.py).
        self.flow_order = (
            [("input", "finite/input"), ("output", "finite/output"), ("loss/content", "loss/content")]
            + [(f"loss/style/{n}", f"loss/style/{n}") for n in layers]
            + [("loss/tv", "loss/tv"), ("loss/total", "loss/total")]
            + [(f"grad/{g}", f"grad_norm/{g}") for g in self.group_names]
            + [("params", "param_norm")]
        )
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- one step
    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch: torch.Tensor) -> torch.Tensor:
        """One optimisation step; returns the metric row, still on the device."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        images = batch.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div(255)
        images = images.contiguous(memory_format=self.memory_format)
        guarded = self.guard_config.enabled  # off: skip the extra finiteness reductions
        one = torch.ones((), device=self.device)
        input_finite = torch.isfinite(images).all() if guarded else one

        with self._autocast():
            output, total, content, style, style_by_layer, tv = self.forward_loss(
                self.model, self.criterion, images, self.loss_weights
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)

        # Gradient norms per parameter group, then global; all on the device.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        per_param = torch._foreach_norm(grads)
        group_norms, start = [], 0
        for group in self.group_params:
            group_norms.append(torch.stack(per_param[start : start + len(group)]).norm())
            start += len(group)
        grad_norm = torch.stack(group_norms).norm()

        clipped = torch.zeros((), device=self.device)
        if self.train_config.clip_norm is not None:
            max_norm = self.train_config.clip_norm
            torch._foreach_mul_(grads, (max_norm / (grad_norm + 1e-6)).clamp(max=1.0))
            clipped = (grad_norm > max_norm).float()

        self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        param_norm = (
            torch.stack(torch._foreach_norm([p.detach() for p in self.params])).norm() if guarded else one
        )
        output_finite = torch.isfinite(output).all() if guarded else one

        values = [content, style, *style_by_layer.unbind(), tv, total, grad_norm, *group_norms]
        values += [clipped, param_norm, input_finite, output_finite]
        return torch.stack([v.detach().float() for v in values])

    # ----------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        previous = torch.get_float32_matmul_precision()
        if self.matmul_precision is not None:
            torch.set_float32_matmul_precision(self.matmul_precision)
        try:
            return self._fit()
        finally:
            torch.set_float32_matmul_precision(previous)

    def _fit(self) -> TrainResult:
        for cb in self.callbacks:
            cb.on_train_start(self)
        self._initial_param_norm = float(
            torch.stack(torch._foreach_norm([p.detach() for p in self.params])).norm()
        )
        self._monitor = DivergenceMonitor(
            self.guard_config.divergence_factor,
            self.guard_config.divergence_warmup,
            self.guard_config.grad_spike_factor,
            self.guard_config.grad_spike_window,
        )
        self._fp16_skips = 0
        check_every = self.train_config.check_every
        pending: list[torch.Tensor] = []
        pending_lr: list[float] = []
        started = time.perf_counter()

        for step in range(1, self.steps + 1):
            pending_lr.append(self.scheduler.get_last_lr()[0])
            pending.append(self.train_step(next(self.batches)))
            if len(pending) == check_every or step == self.steps:
                table = torch.stack(pending).cpu().tolist()  # the only host-device sync
                first = step - len(pending) + 1
                rows = [
                    self._row(first + i, values, lr)
                    for i, (values, lr) in enumerate(zip(table, pending_lr, strict=True))
                ]
                pending.clear()
                pending_lr.clear()
                self._inspect(rows)
                for cb in self.callbacks:
                    cb.on_metrics([self._public(row) for row in rows])
                for cb in self.callbacks:
                    cb.on_check(self, step)

        result = TrainResult(
            self.model, self.steps, [self._public(r) for r in self.history], time.perf_counter() - started
        )
        for cb in self.callbacks:
            cb.on_train_end(result)
        return result

    def _row(self, step: int, values: list[float], lr: float) -> dict[str, float]:
        row = {"step": step, "lr": lr}
        row.update(zip(self.columns, values, strict=True))
        return row

    @staticmethod
    def _public(row: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in row.items() if not k.startswith("finite/")}

    # ----------------------------------------------------------------- guards
    def _first_nonfinite(self, row: dict[str, float]) -> str | None:
        for location, column in self.flow_order:
            value = row[column]
            bad = value == 0.0 if column.startswith("finite/") else not math.isfinite(value)
            if bad:
                return location
        return None

    def _verdict(self, row: dict[str, float], where: str | None) -> str | None:
        """Why this step should halt training (a trigger name), or None when it is fine."""
        if where is not None and self.train_config.precision == "fp16" and where.startswith("grad/"):
            # GradScaler found inf gradients and skipped the update: expected in fp16,
            # unless it keeps happening.
            self._fp16_skips += 1
            return "fp16_skips" if self._fp16_skips > self.guard_config.max_fp16_skips else None
        self._fp16_skips = 0
        if where is not None:
            return "nonfinite"
        return self._monitor.observe(int(row["step"]), row["loss/total"], row["grad_norm/total"])

    def _inspect(self, rows: list[dict[str, float]]) -> None:
        """Check rows in step order; on the first bad one, halt with an autopsy."""
        for index, row in enumerate(rows):
            where = self._first_nonfinite(row)
            trigger = self._verdict(row, where)
            if trigger is not None and self.guard_config.enabled:
                seen = rows[: index + 1]
                self.history.extend(seen)
                autopsy = self._autopsy(row, where, trigger)
                for cb in self.callbacks:
                    cb.on_metrics([self._public(r) for r in seen])
                for cb in self.callbacks:
                    cb.on_halt(autopsy)
                raise TrainingHalted(autopsy)
        self.history.extend(rows)

    def _autopsy(self, bad: dict[str, float], where: str | None, trigger: str) -> Autopsy:
        finite_rows = [r for r in self.history[:-1] if self._first_nonfinite(r) is None]
        last = finite_rows[-1] if finite_rows else None
        wc, ws, wt = self.weights
        # Loss balance as the weights set it: the first step's terms (later ones may be a symptom).
        first = self.history[0]
        ratio = None
        if all(math.isfinite(first[k]) for k in ("loss/content", "loss/style")):
            weighted = [w * first[k] for w, k in ((wc, "loss/content"), (ws, "loss/style")) if w > 0]
            weighted = [v for v in weighted if v > 0]
            if len(weighted) == 2:
                ratio = max(weighted) / min(weighted)
        growth = None
        if last is not None and self._initial_param_norm > 0:
            growth = last["param_norm"] / self._initial_param_norm
        if math.isfinite(bad["param_norm"]) and self._initial_param_norm > 0:
            growth = max(growth or 0.0, bad["param_norm"] / self._initial_param_norm)
        outcome = "diverged" if trigger in ("loss_rise", "grad_spike") else "nan"
        evidence = Evidence(outcome, where, trigger, self.train_config.precision, ratio, growth)
        cause, reason = classify_cause(evidence, self.guard_config.imbalance_ratio)
        losses = {}
        if last is not None:
            losses = {k: last[k] for k in ("loss/content", "loss/style", "loss/tv", "loss/total")}
        grad_tail = [r["grad_norm/total"] for r in self.history[-20:]]
        return Autopsy(
            outcome=outcome,
            step=int(bad["step"]),
            first_nonfinite=where,
            cause=cause,
            reason=reason,
            trigger=trigger,
            last_finite_losses=losses,
            grad_norm_tail=grad_tail,
            lr=bad["lr"],
            clip_norm=self.train_config.clip_norm,
            precision=self.train_config.precision,
            evidence={
                "weighted_loss_ratio": ratio,
                "param_norm_growth": growth,
                "weights": {"content": wc, "style": ws, "tv": wt},
                "bad_step": self._public(bad),
            },
        )
