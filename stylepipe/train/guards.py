"""Guards that stop a training run the moment it goes bad, and the autopsy they leave.

Outcomes (DESIGN.md): ``complete``, ``nan`` (a non-finite value appeared),
``diverged`` (finite but blew up), ``pruned``, ``failed``. The guard produces the
two numeric ones; the search adds the others.

The evidence for one bad step is read from the per-step metric rows the trainer
collects on the device. ``first_nonfinite`` follows the data flow of a step:
input batch -> output image -> content loss -> style loss per layer -> TV loss ->
gradients per parameter group -> parameters after the optimiser step. The first
of those that is non-finite is where the trouble started.

``classify_cause`` is the single rule that maps evidence to a cause. It is
documented rule by rule below and tested on reproductions in tests/test_guards.py.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

CAUSES = (
    "bad_input",
    "precision_overflow",
    "gradient_explosion",
    "parameter_blowup",
    "loss_imbalance",
    "divergence",
    "unknown",
)

# A parameter norm this many times its starting value counts as blown up.
PARAM_BLOWUP_GROWTH = 100.0

DESCRIPTIONS = {
    "input": "the input batch",
    "output": "the output image",
    "loss/content": "the content loss",
    "loss/tv": "the total-variation loss",
    "params": "the parameters after the optimiser step",
}


def describe(location: str | None) -> str:
    """Plain words for a ``first_nonfinite`` location such as ``loss/style/relu1_2``."""
    if location is None:
        return "nothing (all values stayed finite)"
    if location.startswith("loss/style/"):
        return f"the style loss at {location.removeprefix('loss/style/')}"
    if location.startswith("grad/"):
        return f"the gradients of parameter group {location.removeprefix('grad/')}"
    return DESCRIPTIONS.get(location, location)


@dataclass
class Evidence:
    """What the guard saw, reduced to the facts the cause rule needs."""

    outcome: str  # "nan" or "diverged"
    first_nonfinite: str | None  # a location (see module doc), None when diverged while finite
    trigger: str  # "nonfinite", "loss_rise", "grad_spike" or "fp16_skips"
    precision: str
    weighted_loss_ratio: float | None  # largest / smallest weighted loss term at step 1
    param_norm_growth: float | None  # parameter norm at the last finite step / at step 0


def classify_cause(ev: Evidence, imbalance_ratio: float) -> tuple[str, str]:
    """The rule from evidence to cause; returns ``(cause, reason in plain words)``.

    Checked in this order, first match wins:

    1. the input batch was non-finite                        -> bad_input
    2. fp16 and either GradScaler gave up (too many consecutive
       overflowing steps) or a forward value (output, loss) went
       non-finite while the parameters had not blown up       -> precision_overflow
    3. the parameters went non-finite first, or their norm grew
       PARAM_BLOWUP_GROWTH-fold since step 0                  -> parameter_blowup
    4. the weighted loss terms were ``imbalance_ratio`` or more
       apart at the first step (the weights, not a blow-up,
       made them so)                                          -> loss_imbalance
    5. gradients went non-finite first, or the gradient norm
       spiked far above its running median                    -> gradient_explosion
    6. the loss rose far above its running minimum            -> divergence
    7. anything else                                          -> unknown

    Parameter blow-up is tested before loss imbalance because a blown-up network
    makes its loss terms wildly unequal too; the imbalance is then a symptom.
    """
    where = ev.first_nonfinite
    forward = where is not None and (where == "output" or where.startswith("loss/"))
    growth = ev.param_norm_growth
    if where == "input":
        return "bad_input", "the input batch held NaN or Inf pixels before the network saw it"
    if ev.precision == "fp16" and ev.trigger == "fp16_skips":
        return "precision_overflow", "fp16 gradients overflowed on every step; GradScaler could not recover"
    if ev.precision == "fp16" and forward and not (growth and growth >= PARAM_BLOWUP_GROWTH):
        return "precision_overflow", f"{describe(where)} overflowed in fp16 while the parameters were finite"
    if where == "params" or (growth is not None and growth >= PARAM_BLOWUP_GROWTH):
        grown = f" (parameter norm grew {growth:.3g}x)" if growth else ""
        return "parameter_blowup", f"the optimiser step pushed the parameters out of range{grown}"
    ratio = ev.weighted_loss_ratio
    if ratio is not None and ratio >= imbalance_ratio:
        return "loss_imbalance", f"the weighted loss terms were {ratio:.3g}x apart from the first step"
    if (where or "").startswith("grad/") or ev.trigger == "grad_spike":
        return "gradient_explosion", "the gradient norm exploded while the loss was still finite"
    if ev.trigger == "loss_rise":
        return "divergence", "the loss climbed far above its running minimum"
    return "unknown", f"{describe(where)} went non-finite with no clear precursor"


@dataclass
class Autopsy:
    """The record a halted run leaves behind (DESIGN.md, 'Autopsy')."""

    outcome: str
    step: int
    first_nonfinite: str | None
    cause: str
    reason: str
    trigger: str
    last_finite_losses: dict[str, float]
    grad_norm_tail: list[float]
    lr: float
    clip_norm: float | None
    precision: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite numbers become the strings "nan", "inf" and "-inf"."""
        return _finite_json(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def explain(self) -> str:
        clip = "off" if self.clip_norm is None else f"{self.clip_norm:g}"
        what = (
            f"first non-finite value: {describe(self.first_nonfinite)}"
            if self.outcome == "nan"
            else f"diverged ({self.trigger.replace('_', ' ')}) while every value was finite"
        )
        losses = ", ".join(f"{k}={v:.4g}" for k, v in self.last_finite_losses.items()) or "none"
        tail = ", ".join(f"{g:.3g}" for g in self.grad_norm_tail[-5:]) or "none"
        return (
            f"Training stopped at step {self.step}: outcome {self.outcome}, cause {self.cause}.\n"
            f"  {what}\n"
            f"  why: {self.reason}\n"
            f"  last finite losses: {losses}\n"
            f"  gradient norm, last steps: {tail}\n"
            f"  settings in force: lr={self.lr:.3g}, clip_norm={clip}, precision={self.precision}"
        )


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


class TrainingHalted(RuntimeError):
    """Raised by the trainer when a guard fires; carries the autopsy."""

    def __init__(self, autopsy: Autopsy):
        super().__init__(autopsy.explain())
        self.autopsy = autopsy


class DivergenceMonitor:
    """Host-side running statistics for the two 'finite but blew up' checks."""

    def __init__(self, factor: float, warmup: int, spike_factor: float, window: int):
        self.factor = factor
        self.warmup = warmup
        self.spike_factor = spike_factor
        self.loss_min = math.inf
        self.grad_norms: deque[float] = deque(maxlen=window)

    def observe(self, step: int, total_loss: float, grad_norm: float) -> str | None:
        """Returns ``"loss_rise"``/``"grad_spike"`` when step diverges, else None."""
        verdict = None
        if step >= self.warmup and math.isfinite(self.loss_min):
            if total_loss > self.factor * self.loss_min:
                verdict = "loss_rise"
            elif len(self.grad_norms) >= 3 and math.isfinite(grad_norm):
                median = statistics.median(self.grad_norms)
                if median > 0 and grad_norm > self.spike_factor * median:
                    verdict = "grad_spike"
        if math.isfinite(total_loss):
            self.loss_min = min(self.loss_min, total_loss)
        if math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
        return verdict
