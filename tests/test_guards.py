"""Reproductions of the NaN and divergence failures practitioners report, on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from stylepipe.train import Trainer, TrainingHalted
from stylepipe.train.guards import DivergenceMonitor, Evidence, classify_cause
from stylepipe.train.recipe import build_batches, build_criterion


def fit(config, batches=None):
    batches = batches if batches is not None else build_batches(config)
    return Trainer(config, build_criterion(config), batches).fit()


def halt(config, batches=None):
    with pytest.raises(TrainingHalted) as err:
        fit(config, batches)
    return err.value.autopsy


def with_nan_pixel_at(config, bad_step: int):
    """Real batches, except the one for ``bad_step`` (1-based) carries one NaN pixel."""
    source = build_batches(config)
    for step in range(1, 10_000):
        batch = next(source).float().div(255)
        if step == bad_step:
            batch[0, 1, 5, 7] = float("nan")
        yield batch


def test_stable_configuration_trains_and_total_loss_falls(tiny):
    result = fit(tiny("train.steps=25", "train.check_every=5"))
    totals = [row["loss/total"] for row in result.metrics]
    assert len(totals) == 25 and all(math.isfinite(t) for t in totals)
    assert sum(totals[-5:]) / 5 < 0.5 * sum(totals[:5]) / 5
    expected = {"loss/content", "loss/style", "loss/tv", "loss/total", "grad_norm/total", "lr",
                "grad_norm/encoder_in", "grad_norm/decoder_out", "clip/fraction"}  # fmt: skip
    assert expected <= set(result.metrics[0])


def test_absurd_learning_rate_is_caught_when_it_happens(tiny):
    autopsy = halt(tiny("train.lr=10", "train.clip_norm=null"))
    # Adam moves every weight by about lr on step 1; step 2's gradients overflow.
    assert autopsy.outcome == "nan"
    assert autopsy.step == 2
    assert autopsy.cause == "parameter_blowup"
    assert autopsy.evidence["param_norm_growth"] > 100
    assert autopsy.lr == 10 and autopsy.clip_norm is None


def test_clipping_does_not_save_adam_from_an_absurd_learning_rate(tiny):
    # What really happens: Adam divides by the gradient's own scale, so clipping the
    # gradient norm leaves the first update at about lr per weight. Caught at the same step.
    unclipped = halt(tiny("train.lr=10", "train.clip_norm=null"))
    clipped = halt(tiny("train.lr=10", "train.clip_norm=0.5"))
    assert clipped.step == unclipped.step == 2
    assert clipped.cause == "parameter_blowup"
    assert clipped.clip_norm == 0.5


def test_nan_pixel_is_caught_at_that_step_as_bad_input(tiny):
    config = tiny("train.steps=20", "train.check_every=1")
    autopsy = halt(config, with_nan_pixel_at(config, 6))
    assert (autopsy.step, autopsy.first_nonfinite, autopsy.cause) == (6, "input", "bad_input")
    assert autopsy.last_finite_losses["loss/total"] > 0


@pytest.mark.parametrize("check_every", [4, 7])
def test_first_bad_step_is_exact_when_checking_every_k_steps(tiny, check_every):
    config = tiny("train.steps=20", f"train.check_every={check_every}")
    autopsy = halt(config, with_nan_pixel_at(config, 6))
    assert autopsy.step == 6 and autopsy.cause == "bad_input"
    blowup = halt(tiny("train.lr=10", "train.clip_norm=null", f"train.check_every={check_every}"))
    assert blowup.step == 2


def test_metrics_reach_callbacks_up_to_the_bad_step_only(tiny):
    from stylepipe.train import Callback

    seen: list[int] = []

    class Recorder(Callback):
        def on_metrics(self, rows):
            seen.extend(int(r["step"]) for r in rows)

    config = tiny("train.steps=20", "train.check_every=8")
    with pytest.raises(TrainingHalted):
        Trainer(config, build_criterion(config), with_nan_pixel_at(config, 11), callbacks=[Recorder()]).fit()
    assert seen == list(range(1, 12))


def test_fp16_gram_overflow_is_caught_while_fp32_gram_stays_finite(tiny, tmp_path):
    # ImageNet VGG16's early activations are far larger than seeded random ones; a local
    # weights file with every conv scaled 3x brings relu1_2 to that range at 32 px.
    from stylepipe.nets.vgg import load_vgg16_features

    state = {
        k: v * 3 if k.endswith("weight") else v for k, v in load_vgg16_features("random").state_dict().items()
    }
    weights = tmp_path / "vgg_imagenet_like.pth"
    torch.save(state, weights)
    common = ("train.precision=fp16", f"loss.vgg_weights={weights}", "train.steps=2",
              "loss.style_layers=[relu1_2]", "loss.content_layers=[relu1_2]")  # fmt: skip
    autopsy = halt(tiny(*common, "loss.gram_precision=autocast"))
    assert autopsy.step == 1
    assert autopsy.first_nonfinite == "loss/style/relu1_2"
    assert autopsy.cause == "precision_overflow"
    assert autopsy.precision == "fp16"
    result = fit(tiny(*common, "loss.gram_precision=fp32"))
    assert all(math.isfinite(row["loss/style"]) for row in result.metrics)


def test_huge_style_weight_outcome_follows_the_rule(tiny):
    # 1e12: the terms start ~1e8 apart, yet Adam is invariant to the loss scale: it completes.
    result = fit(tiny("loss.style_weight=1e12", "train.steps=6"))
    assert all(math.isfinite(row["loss/total"]) for row in result.metrics)
    # 1e25: the style gradient overflows fp32 on the first step; the rule blames the weights.
    autopsy = halt(tiny("loss.style_weight=1e25"))
    assert autopsy.outcome == "nan" and autopsy.step == 1
    assert autopsy.cause == "loss_imbalance"
    assert autopsy.evidence["weighted_loss_ratio"] >= 1e6


def test_disabled_guards_let_a_nan_run_finish(tiny):
    config = tiny("guard.enabled=false", "train.steps=8")
    result = fit(config, with_nan_pixel_at(config, 3))
    assert math.isnan(result.metrics[-1]["loss/total"])


# --------------------------------------------------------------- the rule and the monitor


def evidence(**kw):
    base = dict(outcome="nan", first_nonfinite=None, trigger="nonfinite", precision="fp32",
                weighted_loss_ratio=10.0, param_norm_growth=1.0)  # fmt: skip
    base.update(kw)
    return Evidence(**base)


@pytest.mark.parametrize(
    "kw, cause",
    [
        (dict(first_nonfinite="input", precision="fp16", param_norm_growth=1e6), "bad_input"),
        (dict(first_nonfinite="loss/style/relu1_2", precision="fp16"), "precision_overflow"),
        (dict(first_nonfinite="grad/residual", trigger="fp16_skips", precision="fp16"), "precision_overflow"),
        (dict(first_nonfinite="output", precision="fp16", param_norm_growth=500.0), "parameter_blowup"),
        (dict(first_nonfinite="params"), "parameter_blowup"),
        (
            dict(first_nonfinite="grad/encoder_in", weighted_loss_ratio=1e9, param_norm_growth=1e3),
            "parameter_blowup",
        ),
        (dict(first_nonfinite="loss/total", weighted_loss_ratio=1e9), "loss_imbalance"),
        (dict(first_nonfinite="grad/encoder_in"), "gradient_explosion"),
        (dict(outcome="diverged", trigger="grad_spike"), "gradient_explosion"),
        (dict(outcome="diverged", trigger="loss_rise"), "divergence"),
        (dict(first_nonfinite="output"), "unknown"),
    ],
)
def test_cause_rule(kw, cause):
    found, reason = classify_cause(evidence(**kw), imbalance_ratio=1e6)
    assert found == cause and reason


def test_monitor_flags_loss_rise_and_gradient_spike_only_after_warmup():
    monitor = DivergenceMonitor(factor=10, warmup=5, spike_factor=100, window=10)
    assert monitor.observe(1, 1.0, 1.0) is None
    assert monitor.observe(2, 50.0, 1.0) is None  # inside warm-up
    for step in range(3, 8):
        assert monitor.observe(step, 1.0, 1.0) is None
    assert monitor.observe(8, 11.0, 1.0) == "loss_rise"
    assert monitor.observe(9, 1.0, 500.0) == "grad_spike"
    assert monitor.observe(10, 1.0, 50.0) is None


def test_autopsy_explains_itself_in_plain_words(tiny):
    autopsy = halt(tiny("train.lr=10", "train.clip_norm=null"))
    text = autopsy.explain()
    assert "step 2" in text and "parameter_blowup" in text and "lr=10" in text
    assert "clip_norm=off" in text and "precision=fp32" in text
    assert '"cause": "parameter_blowup"' in autopsy.to_json()


def test_warmup_ramps_the_learning_rate_and_adamw_bf16_trains_finite(tiny):
    result = fit(tiny("train.warmup_steps=4", "train.lr=0.002", "train.steps=6", "train.optimizer=adamw",
                      "train.weight_decay=0.01", "train.precision=bf16"))  # fmt: skip
    lrs = [row["lr"] for row in result.metrics]
    assert lrs == pytest.approx([0.0005, 0.001, 0.0015, 0.002, 0.002, 0.002])
    assert all(math.isfinite(row["loss/total"]) for row in result.metrics)


def test_clip_fraction_reports_which_steps_were_clipped(tiny):
    result = fit(tiny("train.clip_norm=1e-6", "train.steps=3"))
    assert [row["clip/fraction"] for row in result.metrics] == [1.0, 1.0, 1.0]
    assert all(row["grad_norm/total"] > 1e-6 for row in result.metrics)  # the norm before clipping
