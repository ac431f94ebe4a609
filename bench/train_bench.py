"""Training throughput, side by side in one run (issue 7).

(a) a naive reference loop written like the common example (pytorch/examples
    fast_neural_style): fp32, batch 4, ImageFolder + PIL decode with num_workers=0,
    ``.item()`` on the losses every step;
(b) the stylepipe trainer with its guards on; (c) the same with guards off;
plus the trainer's achieved TFLOP/s (torch.utils.flop_counter) and the overhead of
tracking (a trial logging to MLflow and reporting to Optuna against one that does not).
GPU: 256 px, bf16, batch 16. CPU: 64 px, fp32, batch 4.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from bench.prepare_bench import make_corpus
from stylepipe import tracking
from stylepipe.config import PrepareConfig, load_config
from stylepipe.data.prepare import prepare
from stylepipe.data.shard import load_split
from stylepipe.data.sources import RandomBatches
from stylepipe.nets.transformer import TransformerNet
from stylepipe.search.study import frozen_heap
from stylepipe.tracking import RunLogger
from stylepipe.train import Trainer
from stylepipe.train.recipe import build_criterion

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_loop(folder: Path, config, device: torch.device, steps: int) -> float:
    """Images/s of the common example's loop (its structure; our networks)."""
    size = config.data.image_size
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True)])  # fmt: skip
    loader = DataLoader(
        ImageFolder(str(folder), transform=transform), batch_size=4, shuffle=True, num_workers=0
    )
    criterion = build_criterion(config, device)
    model = TransformerNet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    done = images = 0
    started = None
    while done < steps + 2:
        for x, _ in loader:
            if done == 2:  # two warm-up steps
                _sync(device)
                started, images = time.perf_counter(), 0
            x = x.to(device)
            optimizer.zero_grad()
            y = model(x)
            terms = criterion(y, x)
            content = config.loss.content_weight * terms.content
            style = config.loss.style_weight * terms.style
            (content + style).backward()
            optimizer.step()
            _ = content.item(), style.item()  # the per-step host sync of the example
            done += 1
            images += len(x)
            if done >= steps + 2:
                break
    _sync(device)
    return images / (time.perf_counter() - started)


class PrivateForeachTrainer(Trainer):
    """The trainer with its earlier gradient norms and clipping: one private ``torch._foreach_norm``
    over every gradient, sliced into groups, and ``torch._foreach_mul_`` to clip. Kept to show
    what the public ``get_total_norm``/``clip_grads_with_norm_`` cost against it."""

    def clip_gradients(self):
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
        return group_norms, grad_norm, clipped


def clip_gradients_seconds(config, images: torch.Tensor, device: torch.device, calls: int = 50,
                           rounds: int = 20) -> dict[str, float]:  # fmt: skip
    """Seconds of one ``clip_gradients`` call (norms per group and in total, then clipping), the
    public APIs against the private foreach code, on the same gradients, interleaved, best round."""
    config = config.with_overrides({"train.clip_norm": 1.0})
    best = {}
    trainers = {}
    for name, cls in (("public", Trainer), ("private_foreach", PrivateForeachTrainer)):
        trainers[name] = warm_trainer(config, images, device, cls)[0]
        best[name] = float("inf")
    for _ in range(rounds):
        for name, trainer in trainers.items():
            _sync(device)
            started = time.perf_counter()
            for _ in range(calls):
                trainer.clip_gradients()
            _sync(device)
            best[name] = min(best[name], (time.perf_counter() - started) / calls)
    return best


def warm_trainer(config, images: torch.Tensor, device: torch.device,
                 trainer_cls: type[Trainer] = Trainer) -> tuple[Trainer, float]:  # fmt: skip
    """A trainer after 3 warm-up steps (cudnn autotune, allocator, compilation), and their seconds."""
    config = config.with_overrides({"train.steps": 3})
    batches = RandomBatches(images, config.train.batch_size)
    trainer = trainer_cls(config, build_criterion(config, device), batches, device=device)
    return trainer, timed_fit(trainer, 3, device)


def timed_fit(trainer: Trainer, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` more steps, the device synchronised on both sides."""
    trainer.steps = trainer.step + steps
    _sync(device)
    started = time.perf_counter()
    trainer.fit()
    _sync(device)
    return time.perf_counter() - started


def trainer_speed(config, images: torch.Tensor, device: torch.device, steps: int,
                  warmup: dict | None = None) -> float:  # fmt: skip
    """Images/s over ``steps`` steps; the warm-up's seconds go to ``warmup["seconds"]``."""
    trainer, warm_seconds = warm_trainer(config, images, device)
    if warmup is not None:
        warmup.setdefault("seconds", []).append(warm_seconds)
    return steps * config.train.batch_size / timed_fit(trainer, steps, device)


def interleaved_speeds(configs: dict, images: torch.Tensor, device: torch.device, steps: int,
                       rounds: int = 3) -> dict[str, float]:  # fmt: skip
    """Images/s of several trainer settings (a config, or a config and a Trainer class), measured
    in alternating rounds, best round each: drift of the machine (clocks, other load) then hits
    every setting alike."""
    settings = {name: s if isinstance(s, tuple) else (s, Trainer) for name, s in configs.items()}
    trainers = {
        name: warm_trainer(config, images, device, cls)[0] for name, (config, cls) in settings.items()
    }
    best = dict.fromkeys(trainers, 0.0)
    for _ in range(rounds):
        for name, trainer in trainers.items():
            speed = steps * trainer.train_config.batch_size / timed_fit(trainer, steps, device)
            best[name] = max(best[name], speed)
    return best


def kernel_profile(config, images: torch.Tensor, device: torch.device, path: Path, steps: int = 5) -> None:
    """Where a warm step's time goes: torch.profiler's table of the busiest operators and
    kernels over ``steps`` steps, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    trainer, _ = warm_trainer(config, images, device)  # a compiled graph comes from the process's cache
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        timed_fit(trainer, steps, device)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    path.write_text(f"{steps} steps, {config.data.image_size} px, batch {config.train.batch_size}, "
                    f"{config.train.precision}, compile={config.train.compile}\n{table}")  # fmt: skip


def flops_per_image(config, device: torch.device) -> float:
    criterion = build_criterion(config, device)
    model = TransformerNet().to(device)
    x = torch.rand(config.train.batch_size, 3, config.data.image_size, config.data.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        terms = criterion(model(x), x)
        (terms.content + terms.style).backward()
    return counter.get_total_flops() / len(x)


class MlflowAsyncRunLogger(RunLogger):
    """``RunLogger`` with MLflow's own asynchronous logging, ``log_batch(synchronous=False)``, in
    place of its writer thread; ``flush`` waits for MLflow's operations."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._operations: list = []

    def _send(self, **batch: list) -> None:
        self._operations.append(self.client.log_batch(self.run_id, synchronous=False, **batch))

    def flush(self) -> None:
        for operation in self._operations:
            try:
                operation.wait()
            except Exception as err:
                self.errors.append(f"{type(err).__name__}: {err}")
        self._operations.clear()
        super().flush()


def interleaved_best(variants: dict, repeats: int) -> dict[str, float]:
    """Seconds of each callable: one warm-up each, then ``repeats`` interleaved rounds, best of
    them (the least disturbed run, under the same drift), with the loaded heap frozen, as
    run_trials has it."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    with frozen_heap():
        for _ in range(repeats):
            for name, fn in variants.items():
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return {name: min(seconds) for name, seconds in times.items()}


def tracking_overhead(config, prepared: Path, steps: int, repeats: int = 3) -> dict[str, float]:
    """A trial as a study runs it (Optuna ask/tell and reports, an MLflow run with its params,
    per-step metrics, tags) against the same training alone, with per-step metrics sent every
    step and every ``tracking.log_every`` steps (the default), by the tracker's writer thread
    and by MLflow's own asynchronous logging."""
    import optuna

    from stylepipe.config import TrackingConfig
    from stylepipe.search.candidate import run_candidate
    from stylepipe.search.objective import Objective
    from stylepipe.search.space import baseline_params, trial_values
    from stylepipe.search.study_data import load_study_data
    from stylepipe.session import StudySession

    base = config.with_overrides({"data.content": str(prepared), "train.steps": steps,
                                  "search.eval_every": steps, "search.pruner_startup_trials": 10**6})  # fmt: skip
    params = baseline_params(base)
    every_values = sorted({1, TrackingConfig().log_every})
    with tempfile.TemporaryDirectory() as tmp:
        base = base.with_overrides({"run_dir": tmp})
        data = load_study_data(base)
        unguarded = base.with_overrides({"guard.enabled": False})
        variants = {
            "trial_s_without_tracking": lambda: run_candidate(base, data),
            "trial_s_without_tracking_or_guards": lambda: run_candidate(unguarded, data),
        }
        sessions = []
        writers = {"tracking": RunLogger, "mlflow_async": MlflowAsyncRunLogger}
        for (writer, logger_cls), every in itertools.product(writers.items(), every_values):
            session = StudySession(base.with_overrides({"run_dir": f"{tmp}/{writer}{every}",
                                                        "tracking.log_every": every}))  # fmt: skip
            objective = Objective(session.data, session.tracker, session.parent)

            def one_trial(session=session, objective=objective, logger_cls=logger_cls) -> None:
                session.study.enqueue_trial(trial_values(params))
                with mock.patch.object(tracking, "RunLogger", logger_cls):  # the run's writer, swapped
                    session.study.optimize(objective, n_trials=1)
                if session.study.trials[-1].state != optuna.trial.TrialState.COMPLETE:
                    raise RuntimeError(f"the benchmark trial did not complete: {session.study.trials[-1]}")

            variants[f"trial_s_with_{writer}_every_{every}"] = one_trial
            sessions.append(session)
        # The writer thread against MLflow's async logging, side by side, after the rest: MLflow's
        # logging threads, once started, stay for the life of the process.
        async_names = [name for name in variants if "mlflow_async" in name]
        compared = {f"{name}_beside_async": variants[name] for name in variants if "with_tracking" in name}
        compared.update({name: variants.pop(name) for name in async_names})
        result = interleaved_best(variants, repeats)
        result.update(interleaved_best(compared, max(3, repeats // 2)))
        for session in sessions:
            session.tracker.end_study(session.parent)
    default = result[f"trial_s_with_tracking_every_{TrackingConfig().log_every}"]
    result["tracking_log_every"] = TrackingConfig().log_every
    result["tracking_overhead"] = default / result["trial_s_without_tracking"] - 1
    result["tracking_overhead_every_step"] = (
        result["trial_s_with_tracking_every_1"] / result["trial_s_without_tracking"] - 1
    )
    result["guards_and_tracking_overhead"] = default / result["trial_s_without_tracking_or_guards"] - 1
    for every in every_values:  # the writer thread's cost against MLflow's asynchronous logging's
        thread = result[f"trial_s_with_tracking_every_{every}_beside_async"]
        mlflow_async = result[f"trial_s_with_mlflow_async_every_{every}"]
        result[f"writer_thread_vs_mlflow_async_every_{every}"] = thread / mlflow_async - 1
    return result


def bench_settings(device: torch.device):
    """The benches' trainer settings: GPU 256 px, bf16, batch 16; CPU 64 px, fp32, batch 4."""
    cuda = device.type == "cuda"
    size, batch, precision = (256, 16, "bf16") if cuda else (64, 4, "fp32")
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"data.image_size={size}", f"train.batch_size={batch}", f"train.precision={precision}",
        "train.warmup_steps=0", "train.check_every=50", "train.device=" + device.type,
    ])  # fmt: skip


def bench_images(folder: Path, size: int, device: torch.device) -> tuple[Path, torch.Tensor]:
    """A generated corpus in ``folder``/source, prepared at ``size``: (the source, its images)."""
    source, prepared = folder / "source", folder / "prepared"
    make_corpus(source, 96 if device.type == "cuda" else 32)
    prepare(source, prepared, PrepareConfig(image_size=size, near_duplicate_distance=0,
                                            outlier_min_images=10**9, val_fraction=0.1), progress=False)  # fmt: skip
    return source, load_split(prepared, "all", device=device)


def run(out: Path | None = None) -> dict:
    """Every measurement, cheapest first; the JSON is rewritten after each one, so a run cut
    short by a time limit still leaves what it measured."""
    logging.disable(logging.WARNING)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps, naive_steps = (60, 40) if cuda else (12, 8)
    if cuda:
        torch.backends.cudnn.benchmark = True
    config = bench_settings(device)
    size, batch, precision = config.data.image_size, config.train.batch_size, config.train.precision
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "image_size": size, "batch": batch, "precision": precision}  # fmt: skip

    def record(**values) -> None:
        result.update(values)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_bench.json").write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        source, images = bench_images(Path(tmp), size, device)
        prepared = Path(tmp) / "prepared"
        naive = naive_loop(source, config.with_overrides({"train.precision": "fp32"}), device, naive_steps)
        variants = {"guards_on": config, "guards_off": config.with_overrides({"guard.enabled": False}),
                    "guards_on_private_foreach": (config, PrivateForeachTrainer)}  # fmt: skip
        if cuda:  # the Gram's fp32 products without TF32 tensor cores, for comparison
            variants["guards_on_no_tf32"] = config.with_overrides({"train.tf32": False})
        speeds = interleaved_speeds(variants, images, device, steps, rounds=3 if cuda else 5)
        guarded, unguarded = speeds["guards_on"], speeds["guards_off"]
        flops = flops_per_image(config, device)
        clip_calls = clip_gradients_seconds(config, images, device)
        record(naive_images_per_s=naive, trainer_guards_on_images_per_s=guarded,
               trainer_guards_off_images_per_s=unguarded, speedup_vs_naive=guarded / naive,
               trainer_private_foreach_images_per_s=speeds["guards_on_private_foreach"],
               public_norm_api_cost=speeds["guards_on_private_foreach"] / guarded - 1,
               clip_gradients_public_ms=clip_calls["public"] * 1e3,
               clip_gradients_private_foreach_ms=clip_calls["private_foreach"] * 1e3,
               guard_overhead=unguarded / guarded - 1, gflop_per_image=flops / 1e9,
               achieved_tflops=guarded * flops / 1e12)  # fmt: skip
        if cuda:
            record(trainer_guards_on_no_tf32_images_per_s=speeds["guards_on_no_tf32"])
        if out is not None and not cuda:
            kernel_profile(config, images, device, out / "profile_eager.txt", steps=2)
        try:
            record(**tracking_overhead(config, prepared, steps, repeats=2 if cuda else 8))
        except ImportError as err:  # a bare GPU machine may lack MLflow/Optuna
            record(tracking_skipped=f"{err}")
        except Exception as err:  # say what went wrong, and go on to the compiled variants
            record(tracking_skipped=f"failed: {type(err).__name__}: {err}")
        if cuda:
            # torch.compile of the forward + losses, guards on, compile time excluded; then a
            # second trial (new network, new weights), which reuses the compiled graph.
            for mode in ("default", "reduce-overhead"):
                compiled = config.with_overrides({"train.compile": True, "train.compile_mode": mode})
                warm: dict = {}
                speed = trainer_speed(compiled, images, device, steps, warm)
                trainer_speed(compiled.with_overrides({"loss.style_weight": 3e5}), images, device, 3, warm)
                record(**{f"trainer_compiled_{mode}_images_per_s": speed,
                          f"compiled_{mode}_first_3_steps_s": warm["seconds"]})  # fmt: skip
                if mode == "default" and out is not None:  # what is left after fusion
                    kernel_profile(compiled, images, device, out / "profile_compiled.txt")
    return result


def main(out: Path | None = None) -> None:
    r = run(out)
    print(f"training: {r['device']}, {r['image_size']} px, batch {r['batch']}, {r['precision']}")

    def line(label: str, key: str, unit: str = "images/s") -> None:
        if key in r:
            print(f"  {label:46s} {r[key]:9.1f} {unit}")

    line("(a) naive loop (fp32, batch 4, ImageFolder)", "naive_images_per_s")
    line("(b) stylepipe trainer, guards on", "trainer_guards_on_images_per_s")
    line("(c) stylepipe trainer, guards off", "trainer_guards_off_images_per_s")
    line("    (b) with private torch._foreach norms", "trainer_private_foreach_images_per_s")
    line("    (b) with the Gram in fp32 without TF32", "trainer_guards_on_no_tf32_images_per_s")
    line("(d) (b) + torch.compile", "trainer_compiled_default_images_per_s")
    line("(e) (b) + torch.compile with CUDA graphs", "trainer_compiled_reduce-overhead_images_per_s")
    for mode in ("default", "reduce-overhead"):
        if f"compiled_{mode}_first_3_steps_s" in r:
            first, second = r[f"compiled_{mode}_first_3_steps_s"]
            print(f"  {f'first 3 steps, trial 1 / 2, compile {mode}':46s} {first:8.2f} s / {second:.3f} s")
    print(f"  {'b / a':46s} {r['speedup_vs_naive']:9.2f}x")
    print(f"  {'c / b (guard overhead)':46s} {r['guard_overhead'] * 100:8.1f} %")
    print(f"  {'public norm APIs vs private foreach (cost)':46s} {r['public_norm_api_cost'] * 100:8.1f} %")
    print(f"  {'  one clip_gradients call, public / private':46s} {r['clip_gradients_public_ms']:8.3f} ms / "
          f"{r['clip_gradients_private_foreach_ms']:.3f} ms")  # fmt: skip
    line("FLOP per image", "gflop_per_image", "GFLOP")
    print(f"  {'achieved (guards on)':46s} {r['achieved_tflops']:9.2f} TFLOP/s")
    if "tracking_skipped" in r:
        print(f"  tracking overhead: skipped ({r['tracking_skipped']})")
    elif "tracking_overhead" in r:
        bare, every = r["trial_s_without_tracking"], r["tracking_log_every"]
        print(f"  {'trial without / with tracking':46s} {bare:6.2f} s / "
              f"{r[f'trial_s_with_tracking_every_{every}']:.2f} s ({r['tracking_overhead'] * 100:+.1f} %, "
              f"{(r[f'trial_s_with_tracking_every_{every}'] - bare) * 1000:+.0f} ms a trial), "
              f"metrics every {every} steps")  # fmt: skip
        print(
            f"  {'  the same, metrics every step':46s} {bare:6.2f} s / "
            f"{r['trial_s_with_tracking_every_1']:.2f} s ({r['tracking_overhead_every_step'] * 100:+.1f} %)"
        )
        for step_every in (every, 1):
            thread = r[f"trial_s_with_tracking_every_{step_every}_beside_async"]
            print(f"  {f'  metrics every {step_every}: writer thread / MLflow async':46s} {thread:6.2f} s / "
                  f"{r[f'trial_s_with_mlflow_async_every_{step_every}']:.2f} s "
                  f"({r[f'writer_thread_vs_mlflow_async_every_{step_every}'] * 100:+.1f} %)")  # fmt: skip
        print(f"  {'trial without guards or tracking / with both':46s} "
              f"{r['trial_s_without_tracking_or_guards']:6.2f} s / {r[f'trial_s_with_tracking_every_{every}']:.2f} s "
              f"({r['guards_and_tracking_overhead'] * 100:+.1f} %)")  # fmt: skip


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
