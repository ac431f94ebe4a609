"""A user's mistake is one line and exit status 2: never a traceback, a hang or lost data.

One row per mistake a new user made. Each row builds what it needs under ``tmp_path`` and
gives the command line; the test runs it and asserts the exit status, the one ``error:``
line naming the input, and no traceback. A few rows are not errors but fixes (a 16-bit
image, a tiny or huge one, a file name that is not UTF-8): they exit 0, and their check
says what was wrong before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stylepipe.cli import main
from stylepipe.data.prepare import load_manifest
from stylepipe.nets import TransformerNet
from stylepipe.train.model_file import save_model
from tests.helpers import DEMO

TINY = [
    "data.image_size=32",
    "train.batch_size=2",
    "train.steps=2",
    "train.check_every=1",
    "train.device=cpu",
]


def settings(tmp: Path, *extra: str) -> list[str]:
    args = ["--config", str(DEMO), "--set", f"run_dir={tmp / 'run'}"]
    for override in (*TINY, *extra):
        args += ["--set", override]
    return args


def photo(path: Path, size=(48, 40), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        path
    )
    return path


def model(tmp: Path) -> Path:
    torch.manual_seed(0)
    return save_model(TransformerNet(), tmp / "model.safetensors")


def garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


@dataclass
class Mistake:
    argv: Callable[[Path, Path], list[str]]  # (tmp_path, prepared shard) -> command line
    fragment: str  # in the error line (or in stdout, for the rows that exit 0)
    code: int = 2
    check: Callable[[Path], None] | None = None
    setup: Callable[[Path], object] | None = None  # what is already there before the command
    marks: list = field(default_factory=list)


def _fifo_only(tmp: Path) -> Path:
    (tmp / "src").mkdir()
    os.mkfifo(tmp / "src" / "pipe.jpg")
    return tmp / "src"


def _self_link_only(tmp: Path) -> Path:
    (tmp / "src").mkdir()
    (tmp / "src" / "loop.png").symlink_to(tmp / "src" / "loop.png")
    return tmp / "src"


def _reasons(tmp: Path) -> dict[str, list[str]]:
    manifest = load_manifest(tmp / "out")
    return dict(zip(manifest["path"], manifest["reasons"], strict=True))


def _non_utf8_name(tmp: Path) -> Path:
    (tmp / "src").mkdir()
    photo(tmp / "src" / "ok.png", seed=1)
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name from another system
    photo(tmp / "src" / name, size=(50, 40), seed=2)
    return tmp / "src"


def _sixteen_bit_png(tmp: Path) -> Path:
    """A 16-bit grayscale PNG and, beside it, its 8-bit twin (value / 257)."""
    values = np.random.default_rng(3).integers(0, 65536, (40, 48), dtype=np.uint16)
    Image.fromarray(values).save(tmp / "deep.png")  # mode I;16
    Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB").save(tmp / "twin.png")
    return tmp / "deep.png"


def _same_as_its_8_bit_twin(tmp: Path) -> None:
    model_path = tmp / "model.safetensors"
    assert (
        main(["stylize", "--model", str(model_path), str(tmp / "twin.png"), str(tmp / "twin-out.png")]) == 0
    )
    deep = np.asarray(Image.open(tmp / "out.png"), dtype=np.int16)
    twin = np.asarray(Image.open(tmp / "twin-out.png"), dtype=np.int16)
    assert np.abs(deep - twin).max() <= 2  # before: the input went 99.9 % white


def _size_is(expected: tuple[int, int]) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        with Image.open(tmp / "out.png") as image:
            assert image.size == expected

    return check


def _stack_record(text: str) -> Callable[[Path], Path]:
    """A setup: ``<tmp>/stack/stack.json`` holding ``text``, not a record stylepipe wrote."""

    def setup(tmp: Path) -> Path:
        (tmp / "stack").mkdir(exist_ok=True)
        (tmp / "stack" / "stack.json").write_text(text)
        return tmp / "stack"

    return setup


def _stack_record_kept(tmp: Path) -> None:
    assert (tmp / "stack" / "stack.json").is_file(), "stack.json was removed"
    assert not (tmp / "stack" / "logs").exists(), "a service was started"


def _registered_model(tmp: Path) -> None:
    """A registered model ``style`` with no versions, in the run's default tracking store."""
    from mlflow import MlflowClient

    (tmp / "run").mkdir()
    MlflowClient(f"sqlite:///{tmp / 'run' / 'mlflow.db'}").create_registered_model("style")


# A stack.json of the right shape but for a pid that is text: `down` took it for stopped and removed it.
_TEXT_PID = ('{"folder": "x", "optuna_url": "a", "mlflow_db_url": "b", "prefect_db_url": "c", "services": '
             '[{"name": "mlflow", "pid": "nobody", "command": ["no-such-program"], "log": "l"}]}')  # fmt: skip


def _run_folder(tmp: Path) -> Path:
    """The folder of the run ``train *settings(tmp)`` makes."""
    from stylepipe.config import load_config
    from stylepipe.train.recipe import train_run_folder

    args = settings(tmp)
    return train_run_folder(load_config(DEMO, [args[i + 1] for i, a in enumerate(args) if a == "--set"])).path


def _in_checkpoints(name: str, body: Callable[[Path], None]) -> Callable[[Path], Path]:
    def setup(tmp: Path) -> Path:
        folder = _run_folder(tmp) / "checkpoints"
        folder.mkdir(parents=True)
        body(folder / name)
        return folder / name

    return setup


def _foreign_checkpoint(path: Path) -> None:
    torch.save({"weights": torch.ones(3)}, path)  # tensors only: torch reads it, but it is nobody's state


def _checkpoints_is_a_file(tmp: Path) -> None:
    _run_folder(tmp).mkdir(parents=True)
    (_run_folder(tmp) / "checkpoints").write_text("not a folder\n")


def _untouched(path_of: Callable[[Path], Path], body: bytes) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        assert path_of(tmp).read_bytes() == body, "a file stylepipe did not write was changed"

    return check


def _nan_model(tmp: Path) -> Path:
    net = TransformerNet()
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    path = tmp / "nan.safetensors"
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(path)
    )  # as a bad run once wrote it
    return path


MISTAKES = {
    # ---- settings
    "steps=true is not one step": Mistake(
        lambda t, p: ["train", *settings(t, "train.steps=true")], "train.steps: expected a number"),
    "lr=.inf": Mistake(lambda t, p: ["train", *settings(t, "train.lr=.inf")], "train.lr: Input should be a finite"),
    "device=cuda without a GPU": Mistake(
        lambda t, p: ["train", *settings(t, "train.device=cuda")], "train.device=cuda but this machine has no CUDA",
        marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")]),
    "device=banana": Mistake(
        lambda t, p: ["train", *settings(t, "train.device=banana")], "train.device: expected auto, cpu"),
    "a quote in the name": Mistake(
        lambda t, p: ["search", "--quiet", *settings(t, "name=it's", f"data.content={p}")], "name: use letters"),
    "worker --processes -1": Mistake(
        lambda t, p: ["worker", "--processes", "-1", *settings(t, f"data.content={p}")], "--processes -1"),
    # ---- prepare
    "a FIFO in the source does not hang": Mistake(
        lambda t, p: ["prepare", str(_fifo_only(t)), str(t / "out"), "--quiet"], "nothing usable",
        check=lambda t: _reasons(t)["pipe.jpg"] == ["not_a_regular_file"] or pytest.fail(str(_reasons(t)))),
    "a symlink to itself": Mistake(
        lambda t, p: ["prepare", str(_self_link_only(t)), str(t / "out"), "--quiet"], "nothing usable",
        check=lambda t: _reasons(t)["loop.png"] == ["symlink_loop"] or pytest.fail(str(_reasons(t)))),
    "an output folder inside the source": Mistake(
        lambda t, p: ["prepare", str(photo(t / "src" / "a.png").parent), str(t / "src" / "out"), "--quiet"],
        "must not be inside the source", check=lambda t: not (t / "src" / "out").exists() or pytest.fail("created")),
    "an output path that is a file": Mistake(
        lambda t, p: ["prepare", str(photo(t / "src" / "a.png").parent), str(garbage(t / "out")), "--quiet"],
        "it is a file, not a folder"),
    "an output folder that cannot be written": Mistake(
        lambda t, p: ["prepare", str(photo(t / "src" / "a.png").parent), str(garbage(t / "f") / "out"), "--quiet"],
        "cannot write to the output folder"),
    "a file name that is not UTF-8": Mistake(
        lambda t, p: ["prepare", str(_non_utf8_name(t)), str(t / "out"), "--quiet", "--set", "prepare.min_size=32",
                      "--set", "prepare.image_size=32"], "2 files: 2 kept", code=0,
        check=lambda t: "caf\\xe9.png" in _reasons(t) or pytest.fail(str(_reasons(t)))),
    "an empty folder": Mistake(
        lambda t, p: ["prepare", str((t / "empty").mkdir() or t / "empty"), str(t / "out"), "--quiet"],
        "nothing usable in", check=lambda t: (t / "out" / "report.md").is_file() or pytest.fail("no report")),
    "only broken files": Mistake(
        lambda t, p: ["prepare", str(garbage(t / "src" / "b.jpg").parent), str(t / "out"), "--quiet"],
        "none of its 1 files could be kept"),
    # ---- stylize
    "the output is the input": Mistake(
        lambda t, p: ["stylize", "--model", str(model(t)), str(photo(t / "in.png")), str(t / "in.png")],
        "is the input image: refusing to overwrite",
        check=lambda t: np.array_equal(np.asarray(Image.open(t / "in.png")), np.asarray(Image.open(photo(
            t / "again.png")))) or pytest.fail("the original changed")),  # fmt: skip
    "a 16-bit PNG": Mistake(
        lambda t, p: ["stylize", "--model", str(model(t)), str(_sixteen_bit_png(t)), str(t / "out.png")],
        "stylised image", code=0, check=_same_as_its_8_bit_twin),
    "a 1x1 image": Mistake(
        lambda t, p: ["stylize", "--model", str(model(t)), str(photo(t / "in.png", (1, 1))), str(t / "out.png")],
        "stylised image", code=0, check=_size_is((1, 1))),
    "a 2x2 image": Mistake(
        lambda t, p: ["stylize", "--model", str(model(t)), str(photo(t / "in.png", (2, 2))), str(t / "out.png")],
        "stylised image", code=0, check=_size_is((2, 2))),
    "a huge image is shrunk by default": Mistake(
        lambda t, p: ["stylize", "--model", str(model(t)), str(photo(t / "in.png", (2100, 120))), str(t / "out.png")],
        "stylised image", code=0, check=_size_is((2048, 117))),  # longer side over 2048: shrunk, shape kept
    "an output that cannot be written": Mistake(
        lambda t, p: ["stylize", "--model", str(model(t)), str(photo(t / "in.png")), str(garbage(t / "f") / "o.png")],
        "cannot write to the output folder"),
    "an unknown output extension": Mistake(
        lambda t, p: ["stylize", "--model", str(model(t)), str(photo(t / "in.png")), str(t / "out.xyz")],
        ".xyz is not an image type"),
    "a text file named .pt": Mistake(
        lambda t, p: ["stylize", "--model", str(_text(t / "m.pt")), str(photo(t / "in.png")), str(t / "o.png")],
        "m.pt: not a file written by torch.save"),
    # ---- storage
    "a tracking database that cannot be opened": Mistake(
        lambda t, p: ["search", "--quiet", *settings(t, f"data.content={p}",
                                                     f"tracking.uri=sqlite:///{garbage(t / 'f')}/mlflow.db")],
        "cannot use the MLflow tracking store sqlite:///"),
    "a tracking server that is not there": Mistake(
        lambda t, p: ["search", "--quiet", *settings(t, f"data.content={p}",
                                                     "tracking.uri=postgresql://nobody@127.0.0.1:1/mlflow")],
        "cannot use the MLflow tracking store postgresql://nobody@127.0.0.1:1/mlflow"),
    "an MLflow server that is not there": Mistake(
        lambda t, p: ["worker", "--quiet", *settings(t, f"data.content={p}",
                                                     "tracking.uri=http://me:s3cret@127.0.0.1:9")],
        "cannot use the MLflow tracking store http://me:***@127.0.0.1:9: the server does not answer"),
    "stylize from a registered model that does not exist": Mistake(
        lambda t, p: ["stylize", "--model", "models:/nosuch@champion", str(photo(t / "in.png")), str(t / "o.png"),
                      *settings(t)],
        "nosuch has no version with the alias champion"),
    "stylize from the registry of a corrupted tracking database": Mistake(
        lambda t, p: ["stylize", "--model", "models:/style@champion", str(photo(t / "in.png")), str(t / "o.png"),
                      *settings(t, f"tracking.uri=sqlite:///{garbage(t / 'mlflow.db')}")],
        "mlflow.db is corrupted"),
    "stylize from a version that is not registered": Mistake(
        lambda t, p: ["stylize", "--model", "models:/style/99", str(photo(t / "in.png")), str(t / "o.png"),
                      *settings(t)],
        "style has no version 99 in sqlite:///", setup=_registered_model),
    "stylize from a registered model that does not exist, by version": Mistake(
        lambda t, p: ["stylize", "--model", "models:/nosuch/1", str(photo(t / "in.png")), str(t / "o.png"),
                      *settings(t)],
        "no model is registered as nosuch in sqlite:///"),
    "an Optuna storage in a folder that is a file": Mistake(
        lambda t, p: ["search", "--quiet", *settings(t, f"data.content={p}",
                                                     f"search.storage=sqlite:///{garbage(t / 'f')}/x.db")],
        "/f/x.db: cannot write to the folder of the SQLite file"),
    "a registry URI without an alias or version": Mistake(
        lambda t, p: ["stylize", "--model", "models:/nosuch", str(photo(t / "in.png")), str(t / "o.png")],
        "give a registered model as models:/NAME@ALIAS"),
    "a corrupted optuna.db": Mistake(
        lambda t, p: ["search", "--quiet", *settings(t, f"data.content={p}")],
        "optuna.db is corrupted", setup=lambda t: garbage(t / "run" / "optuna.db")),
    "a corrupted mlflow.db": Mistake(
        lambda t, p: ["search", "--quiet", *settings(t, f"data.content={p}")],
        "mlflow.db is corrupted", setup=lambda t: garbage(t / "run" / "mlflow.db")),
    "a run folder that cannot be written": Mistake(
        lambda t, p: ["train", *settings(t), "--set", f"run_dir={garbage(t / 'f') / 'run'}"],
        "cannot write to the run folder"),
    # ---- a run's files read back are untrusted
    "a foreign step-00000050.pt among a run's checkpoints": Mistake(
        lambda t, p: ["train", *settings(t)], "no checkpoint in",
        setup=_in_checkpoints("step-00000050.pt", _foreign_checkpoint),
        check=lambda t: (_run_folder(t) / "checkpoints" / "step-00000050.pt").is_file() or pytest.fail("deleted")),
    "a step-latest.pt among a run's checkpoints is not read": Mistake(
        lambda t, p: ["train", *settings(t)], "trained 2 steps", code=0,
        setup=_in_checkpoints("step-latest.pt", lambda path: path.write_bytes(b"mine")),
        check=_untouched(lambda t: _run_folder(t) / "checkpoints" / "step-latest.pt", b"mine")),
    "a run's checkpoints folder that is a file": Mistake(
        lambda t, p: ["train", *settings(t)], "cannot write the checkpoint", setup=_checkpoints_is_a_file),
    "a folder given as the model": Mistake(
        lambda t, p: ["stylize", "--model", str((t / "empty").mkdir() or t / "empty"), str(photo(t / "in.png")),
                      str(t / "o.png")], "is a folder without a model.safetensors"),
    "a model whose weights are NaN": Mistake(
        lambda t, p: ["stylize", "--model", str(_nan_model(t)), str(photo(t / "in.png")), str(t / "o.png")],
        "hold NaN or Inf", check=lambda t: not (t / "o.png").exists() or pytest.fail("an image was written")),
    # ---- stack: a stack.json stylepipe did not write is refused before anything starts or stops
    "stack down with a stack.json that is not JSON": Mistake(
        lambda t, p: ["stack", "down", "--folder", str(t / "stack")], "stack.json is not a stack record stylepipe wrote",
        setup=lambda t: garbage(t / "stack" / "stack.json"), check=_stack_record_kept),
    "stack up with a stack.json that is not JSON": Mistake(
        lambda t, p: ["stack", "up", "--folder", str(t / "stack")], "if no stack processes run from it, remove it",
        setup=lambda t: garbage(t / "stack" / "stack.json"), check=_stack_record_kept),
    "stack up with a stack.json that is a list": Mistake(
        lambda t, p: ["stack", "up", "--folder", str(t / "stack")], "it holds a list, not an object",
        setup=_stack_record("[]"), check=_stack_record_kept),
    "stack down with a stack.json without its fields": Mistake(
        lambda t, p: ["stack", "down", "--folder", str(t / "stack")],
        "no folder, optuna_url, mlflow_db_url, prefect_db_url", setup=_stack_record('{"services": []}'),
        check=_stack_record_kept),
    "stack down with a stack.json whose pid is text": Mistake(
        lambda t, p: ["stack", "down", "--folder", str(t / "stack")], "services[0].pid is not a process id",
        setup=_stack_record(_TEXT_PID), check=_stack_record_kept),
}  # fmt: skip


def _text(path: Path) -> Path:
    path.write_text("these are not weights\n")
    return path


@pytest.mark.timeout(180)  # a hang (a FIFO opened for reading) fails instead of stalling the suite
@pytest.mark.parametrize("name", [pytest.param(n, marks=m.marks) for n, m in MISTAKES.items()])
def test_a_users_mistake_is_one_line_and_exit_2(name, tmp_path, prepared, capsys):
    mistake = MISTAKES[name]
    if mistake.setup is not None:
        mistake.setup(tmp_path)
    code = main(mistake.argv(tmp_path, prepared))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == mistake.code, out + err
    if mistake.code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and mistake.fragment in errors[0], err
    else:
        assert mistake.fragment in out, out + err
    if mistake.check is not None:
        mistake.check(tmp_path)


@pytest.mark.parametrize("command", ["deploy", "deploy-worker"])
def test_a_prefect_server_that_is_not_there_is_one_line_naming_it(command, tmp_path, monkeypatch, capsys):
    from flows.cli import main as flow_main

    monkeypatch.setenv("PREFECT_API_URL", "http://me:s3cret@127.0.0.1:9/api")
    code = flow_main([command, "--pool", "gpu", *settings(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err and "s3cret" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "Prefect server at PREFECT_API_URL=http://me:***@127.0.0.1:9/api" in errors[0]
    ), err

    monkeypatch.delenv("PREFECT_API_URL")
    assert flow_main([command, "--pool", "gpu", *settings(tmp_path)]) == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["stylize from a version that is not registered"])
def test_a_users_mistake_prints_no_library_warning(name, tmp_path):
    """As a user runs it: a fresh process (Python shows a warning once per process, so the rows
    above, in this one, may not see it). MLflow's UserWarning on importing its PythonModel came
    before the error line; stderr is now that one line."""
    mistake = MISTAKES[name]
    if mistake.setup is not None:
        mistake.setup(tmp_path)
    command = [Path(sys.executable).with_name("stylepipe"), *mistake.argv(tmp_path, None)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Warning" not in done.stderr and "warnings.warn" not in done.stderr, done.stderr
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert mistake.fragment in lines[0], done.stderr


@pytest.mark.timeout(300)
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes_later(tmp_path):
    """Before: a traceback (exit 1), and the cut-short temporary stayed beside the checkpoints."""
    import resource

    limit = 4 * 2**20  # room for the code's caches and the metrics, not for a 20 MB checkpoint

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    command = [Path(sys.executable).with_name("stylepipe"), *["train", *settings(tmp_path)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, preexec_fn=small_disk)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and "cannot write the checkpoint" in errors[0] and "File too large" in errors[0]
    folder = _run_folder(tmp_path)
    assert not [p.name for p in (folder / "checkpoints").iterdir()]  # no temporary left
    assert '"state": "interrupted"' in (folder / "run.json").read_text()
    assert main(["train", *settings(tmp_path)]) == 0  # with room again, the same command trains it
