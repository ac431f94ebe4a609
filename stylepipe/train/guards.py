"""Guards that stop a training run the moment it goes bad, and the autopsy they leave.

Outcomes (docs/design.md): ``complete``, ``nan`` (a non-finite value appeared),
``diverged`` (finite but blew up), ``pruned``, ``failed``. The guard produces the
two numeric ones; the search adds the others.

The evidence for one bad step is read from the per-step metric rows the trainer
collects on the device. ``first_nonfinite`` follows the data flow of a step:
input batch -> output image -> content loss -> style loss per layer -> TV loss ->
gradients per parameter group -> parameters after the optimiser step. The first
of those that is non-finite is where the trouble started.

``RunGuard`` reads those rows in step order, keeps the running statistics (divergence
monitor, consecutive fp16 skips) and, at the first bad step, gathers the evidence into an
``Autopsy``. ``classify_cause`` is the single rule that maps evidence to a cause. It is
documented rule by rule below and tested on reproductions in tests/test_guards.py.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stylepipe.config import GuardConfig

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
    """The record a halted run leaves behind (docs/design.md, 'Autopsy')."""

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

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Autopsy:
        """An autopsy read back from its JSON (``to_dict``); other keys beside it are ignored."""
        number = lambda v: None if v is None else float(v)  # noqa: E731  ("nan" and "inf" come back)
        fields = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        fields["lr"] = number(fields["lr"])
        fields["clip_norm"] = number(fields.get("clip_norm"))
        fields["last_finite_losses"] = {k: number(v) for k, v in fields.get("last_finite_losses", {}).items()}
        fields["grad_norm_tail"] = [number(v) for v in fields.get("grad_norm_tail", [])]
        return cls(**fields)

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


def flow_order(style_layers: list[str], group_names: list[str]) -> list[tuple[str, str]]:
    """Where a step can first go non-finite, in data-flow order: (location, metric column)."""
    return (
        [("input", "finite/input"), ("output", "finite/output"), ("loss/content", "loss/content")]
        + [(f"loss/style/{n}", f"loss/style/{n}") for n in style_layers]
        + [("loss/tv", "loss/tv"), ("loss/total", "loss/total")]
        + [(f"grad/{g}", f"grad_norm/{g}") for g in group_names]
        + [("params", "param_norm")]
    )


class RunGuard:
    """The guards of one training run: reads each step's metric row, in step order, and says
    when training must stop; then gathers the evidence of that step into an ``Autopsy``.

    A row holds the step's losses, gradient norms per group (before clipping), the parameter
    norm after the update, 1/0 flags for a finite input batch and output image, and ``lr``.
    """

    def __init__(
        self,
        config: GuardConfig,
        precision: str,
        clip_norm: float | None,
        weights: tuple[float, float, float],
        style_layers: list[str],
        group_names: list[str],
    ):
        self.config = config
        self.precision = precision
        self.clip_norm = clip_norm
        self.weights = weights
        self.order = flow_order(style_layers, group_names)
        self.start(initial_param_norm=0.0)

    def start(self, initial_param_norm: float) -> None:
        """Fresh running statistics for a run whose parameters start at this norm."""
        self.initial_param_norm = initial_param_norm
        self.monitor = DivergenceMonitor(
            self.config.divergence_factor,
            self.config.divergence_warmup,
            self.config.grad_spike_factor,
            self.config.grad_spike_window,
        )
        self.fp16_skips = 0

    def state_dict(self) -> dict:
        monitor = self.monitor
        return {
            "initial_param_norm": self.initial_param_norm,
            "fp16_skips": self.fp16_skips,
            "loss_min": monitor.loss_min,
            "grad_norms": list(monitor.grad_norms),
        }

    def load_state_dict(self, state: dict) -> None:
        self.start(state["initial_param_norm"])
        self.fp16_skips = state["fp16_skips"]
        self.monitor.loss_min = state["loss_min"]
        self.monitor.grad_norms.extend(state["grad_norms"])

    def first_nonfinite(self, row: dict[str, float]) -> str | None:
        for location, column in self.order:
            value = row[column]
            if value == 0.0 if column.startswith("finite/") else not math.isfinite(value):
                return location
        return None

    def check(self, row: dict[str, float]) -> tuple[str | None, str | None]:
        """``(trigger, first_nonfinite)`` for one step; the trigger is None when training goes on."""
        where = self.first_nonfinite(row)
        if not self.config.enabled:
            return None, where
        if where is not None and self.precision == "fp16" and where.startswith("grad/"):
            # GradScaler found inf gradients and skipped the update: expected in fp16,
            # unless it keeps happening.
            self.fp16_skips += 1
            return ("fp16_skips" if self.fp16_skips > self.config.max_fp16_skips else None), where
        self.fp16_skips = 0
        if where is not None:
            return "nonfinite", where
        return self.monitor.observe(int(row["step"]), row["loss/total"], row["grad_norm/total"]), None

    def late_autopsy(self, history: list[dict[str, float]], after_step: int) -> Autopsy:
        """The autopsy of a run whose parameters were found non-finite at a checkpoint, with the
        guards off (nothing stopped it at the time): the first step after ``after_step`` with a
        non-finite value, from the rows as they are; the parameters at the last step when every
        row looks finite (with the guards off the rows carry no parameter norm)."""
        stretch = [i for i, row in enumerate(history) if row["step"] > after_step]
        bad = next((i for i in stretch if self.first_nonfinite(history[i]) is not None), None)
        if bad is None:
            autopsy = self.autopsy(history, "params", "nonfinite")
        else:
            autopsy = self.autopsy(history[: bad + 1], self.first_nonfinite(history[bad]), "nonfinite")
        autopsy.reason += " (the guards were off: found when the checkpoint was checked)"
        return autopsy

    def autopsy(self, history: list[dict[str, float]], where: str | None, trigger: str) -> Autopsy:
        """The autopsy of the last row of ``history`` (the bad step), from the rows before it."""
        bad = history[-1]
        finite_rows = [r for r in history[:-1] if self.first_nonfinite(r) is None]
        last = finite_rows[-1] if finite_rows else None
        wc, ws, wt = self.weights
        # Loss balance as the weights set it: the first step's terms (later ones may be a symptom).
        first = history[0]
        ratio = None
        if all(math.isfinite(first[k]) for k in ("loss/content", "loss/style")):
            weighted = [w * first[k] for w, k in ((wc, "loss/content"), (ws, "loss/style")) if w > 0]
            weighted = [v for v in weighted if v > 0]
            if len(weighted) == 2:
                ratio = max(weighted) / min(weighted)
        growth = None
        start = self.initial_param_norm
        if last is not None and start > 0:
            growth = last["param_norm"] / start
        if math.isfinite(bad["param_norm"]) and start > 0:
            growth = max(growth or 0.0, bad["param_norm"] / start)
        outcome = "diverged" if trigger in ("loss_rise", "grad_spike") else "nan"
        cause, reason = classify_cause(
            Evidence(outcome, where, trigger, self.precision, ratio, growth), self.config.imbalance_ratio
        )
        losses = {k: last[k] for k in ("loss/content", "loss/style", "loss/tv", "loss/total")} if last else {}
        return Autopsy(
            outcome=outcome,
            step=int(bad["step"]),
            first_nonfinite=where,
            cause=cause,
            reason=reason,
            trigger=trigger,
            last_finite_losses=losses,
            grad_norm_tail=[r["grad_norm/total"] for r in history[-20:]],
            lr=bad["lr"],
            clip_norm=self.clip_norm,
            precision=self.precision,
            evidence={
                "weighted_loss_ratio": ratio,
                "param_norm_growth": growth,
                "weights": {"content": wc, "style": ws, "tv": wt},
                "bad_step": {k: v for k, v in bad.items() if not k.startswith("finite/")},
            },
        )
