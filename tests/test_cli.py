"""The commands a user types: train, stylize, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stylepipe.cli import main
from stylepipe.train.model_file import ModelFileError, load_model, save_model
from tests.helpers import DEMO

TINY = [
    "data.image_size=32",
    "train.batch_size=2",
    "train.steps=6",
    "train.check_every=3",
    "train.device=cpu",
]


def train_args(tmp_path, *extra):
    args = ["train", "--config", str(DEMO), "--set", f"run_dir={tmp_path / 'run'}"]
    for override in (*TINY, *extra):
        args += ["--set", override]
    return args


def run_folder(tmp_path, *extra):
    """The folder of the run ``train_args(tmp_path, *extra)`` makes."""
    from stylepipe.config import load_config
    from stylepipe.train.recipe import train_run_folder

    args = train_args(tmp_path, *extra)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return train_run_folder(load_config(DEMO, overrides)).path


def test_train_writes_its_model_and_metrics_csv_in_the_runs_own_folder(tmp_path, capsys):
    assert main(train_args(tmp_path)) == 0
    run = run_folder(tmp_path)
    assert run.parent == tmp_path / "run" / "train"
    printed = capsys.readouterr().out
    assert str(run / "model.safetensors") in printed and str(run / "metrics.csv") in printed
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["step"]) == [1, 2, 3, 4, 5, 6]
    assert {"loss/total", "grad_norm/total", "grad_norm/encoder_in", "lr"} <= set(metrics.columns)
    state = load_file(str(run / "model.safetensors"))
    assert "encoder_in.1.weight" in state


def test_halted_training_prints_the_autopsy_and_exits_non_zero(tmp_path, capsys):
    code = main(train_args(tmp_path, "train.lr=10", "train.clip_norm=null", "train.warmup_steps=0",
                           "train.recovery=false"))  # fmt: skip
    assert code != 0
    printed = capsys.readouterr().err
    assert "step 2" in printed and "parameter_blowup" in printed and "lr=10" in printed
    run = run_folder(
        tmp_path, "train.lr=10", "train.clip_norm=null", "train.warmup_steps=0", "train.recovery=false"
    )
    autopsy = json.loads((run / "autopsy.json").read_text())
    assert autopsy["cause"] == "parameter_blowup" and autopsy["step"] == 2
    assert not (run / "model.safetensors").exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--set", "train.lr=fast"], "train.lr"),
        (["--set", "loss.vgg_weights=/no/such/vgg16.pth"], "/no/such/vgg16.pth"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(tmp_path, capsys, extra, fragment):
    assert main([*train_args(tmp_path), *extra]) == 2
    assert fragment in capsys.readouterr().err


def test_checkpoint_round_trips(tmp_path):
    from stylepipe.nets import TransformerNet

    torch.manual_seed(1)
    model = TransformerNet().eval()
    path = save_model(model, tmp_path / "m.safetensors", {"note": "x"})
    loaded = load_model(path)
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    assert torch.equal(load_model(pt).encoder_in[1].weight, model.encoder_in[1].weight)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "junk.safetensors")


def test_stylize_writes_an_image_of_the_input_size(tmp_path, capsys):
    assert main(train_args(tmp_path)) == 0
    source = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(source)
    target = tmp_path / "out" / "styled.jpg"
    code = main(
        ["stylize", "--model", str(run_folder(tmp_path) / "model.safetensors"), str(source), str(target)]
    )
    assert code == 0
    with Image.open(target) as styled:
        assert styled.size == (50, 37) and styled.mode == "RGB"
    assert main(["stylize", "--model", str(tmp_path / "absent.safetensors"), str(source), str(target)]) == 2


def test_a_style_image_names_only_a_bundled_scikit_image_picture(tmp_path, capsys, monkeypatch):
    import skimage.data

    called = []
    monkeypatch.setattr(skimage.data, "download_all", lambda *a, **k: called.append(a), raising=False)
    assert main(train_args(tmp_path, "data.style_image=skimage:download_all")) == 2
    err = capsys.readouterr().err
    assert "skimage:download_all is not one of scikit-image's bundled images" in err and "astronaut" in err
    assert called == []  # the function was never run
