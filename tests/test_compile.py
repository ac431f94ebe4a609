"""The fast path: the compiled trainer (same numbers and guards as eager, one graph for every
trial of a study) and the TF32 setting.

Inductor needs over a minute to compile these networks on two CPU cores, so the tests swap
in the ``aot_eager`` backend: the same Dynamo capture, guards and AOTAutograd backward, run
by eager kernels. What inductor's kernels do to speed is measured on a GPU by the benchmark.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from stylepipe.data.sources import RandomBatches
from stylepipe.train import Trainer, TrainingHalted
from stylepipe.train import trainer as trainer_module
from stylepipe.train.recipe import build_criterion


@pytest.fixture
def aot_eager(monkeypatch):
    real_compile = torch.compile
    modes: list[str] = []

    def compile_with_aot_eager(fn, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    trainer_module.compiled_forward_loss.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    yield modes
    trainer_module.compiled_forward_loss.cache_clear()
    torch._dynamo.reset()


def run(config, images):
    criterion = build_criterion(config)
    return Trainer(config, criterion, RandomBatches(images, config.train.batch_size, seed=0)).fit()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_later_trials_reuse_the_graph(tiny, aot_eager):
    config = tiny("train.steps=4", "train.compile=true", "train.compile_mode=reduce-overhead")
    images = torch.rand(8, 3, 32, 32)
    compiled = run(config, images)
    eager = run(config.with_overrides({"train.compile": False}), images)
    for mine, reference in zip(compiled.metrics, eager.metrics, strict=True):
        assert mine["loss/total"] == pytest.approx(reference["loss/total"], rel=1e-5)
        assert mine["grad_norm/total"] == pytest.approx(reference["grad_norm/total"], rel=1e-4)
    assert aot_eager == ["reduce-overhead"]  # the configured mode reached torch.compile

    # Another trial: new network, new learning rate and loss weights, same shapes.
    graphs = counters["stats"]["unique_graphs"]
    run(config.with_overrides({"train.lr": 3e-3, "loss.style_weight": 3e5, "loss.tv_weight": 1e-5}), images)
    assert counters["stats"]["unique_graphs"] == graphs == 1
    assert aot_eager == ["reduce-overhead"]  # compiled once per process


@pytest.mark.slow
def test_guards_catch_a_blow_up_inside_the_compiled_step_at_the_same_step(tiny, aot_eager):
    config = tiny("train.lr=10", "train.clip_norm=null", "train.compile=true")
    images = torch.rand(8, 3, 32, 32)
    with pytest.raises(TrainingHalted) as compiled:
        run(config, images)
    with pytest.raises(TrainingHalted) as eager:
        run(config.with_overrides({"train.compile": False}), images)
    assert compiled.value.autopsy.step == eager.value.autopsy.step == 2
    assert compiled.value.autopsy.cause == eager.value.autopsy.cause == "parameter_blowup"


def test_the_tf32_setting_holds_while_training_and_is_put_back_even_after_a_halt(tiny):
    from stylepipe.train import Callback

    seen = []

    class Spy(Callback):
        def on_check(self, state):
            seen.append(torch.get_float32_matmul_precision())

    config = tiny("train.lr=10", "train.clip_norm=null", "train.steps=3")
    trainer = Trainer(
        config, build_criterion(config), RandomBatches(torch.rand(8, 3, 32, 32), 2), callbacks=[Spy()]
    )
    assert trainer.matmul_precision is None  # CPU: TF32 is a CUDA matter, left alone
    trainer.matmul_precision = "high"  # what train.tf32=true sets on a CUDA device
    before = torch.get_float32_matmul_precision()
    with pytest.raises(TrainingHalted):
        trainer.fit()
    assert seen and set(seen) == {"high"}
    assert torch.get_float32_matmul_precision() == before == "highest"


def test_each_step_tells_cuda_graphs_that_a_new_step_begins(tiny, monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    config = tiny("train.steps=5")
    trainer = Trainer(config, build_criterion(config), RandomBatches(torch.rand(8, 3, 32, 32), 2))
    trainer.fit()
    assert marks == []  # eager (and CPU): no CUDA graphs to tell
    trainer.cuda_graphs = True  # what train.compile_mode=reduce-overhead sets on a CUDA device
    trainer.steps += 5  # fit() goes on from the step it reached
    trainer.fit()
    assert len(marks) == 5
