"""Small promises everything else leans on: whole files or none, tensors without pickle,
passwords never shown."""

from __future__ import annotations

import pytest
import torch

from stylepipe.files import atomic_path, read_state_dict, write_json
from stylepipe.stores import redact_url, scrub


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "safest.json"
    write_json(target, {"trial": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"tri')  # half written, then the writer dies
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "trial": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["safest.json"]


def test_the_temporary_file_keeps_the_suffix_writers_choose_formats_by(tmp_path):
    import numpy as np

    with atomic_path(tmp_path / "cache" / "pixels.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent.is_dir()
        np.save(tmp, np.arange(3))  # numpy appends .npy to any other name
    assert np.load(tmp_path / "cache" / "pixels.npy").tolist() == [0, 1, 2]


def test_state_dicts_are_read_without_running_code(tmp_path):
    weights = {"w": torch.ones(2)}
    torch.save(weights, tmp_path / "ok.pt")
    assert torch.equal(read_state_dict(tmp_path / "ok.pt")["w"], weights["w"])

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported|global"):
        read_state_dict(tmp_path / "evil.pt")
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a state_dict"):
        read_state_dict(tmp_path / "tensor.pt")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://user:S3cret@db:5432/optuna", "postgresql://user:***@db:5432/optuna"),
        ("postgresql+psycopg://user:p%40ss@db/optuna", "postgresql+psycopg://user:***@db/optuna"),
        ("http://user:S3cret@mlflow.example:5000", "http://user:***@mlflow.example:5000"),
        ("https://user:S3cret@mlflow.example/api", "https://user:***@mlflow.example/api"),
        ("postgresql://user@db/optuna", "postgresql://user@db/optuna"),
        (
            "postgresql://db/optuna?user=u&password=S3cret&sslmode=require",
            "postgresql://db/optuna?user=u&password=***&sslmode=require",
        ),  # fmt: skip
        ("sqlite:////runs/optuna.db", "sqlite:////runs/optuna.db"),
        ("not a url with S3cret@db", "not a url with S3cret@db"),  # no scheme: nothing to mask
    ],
)
def test_urls_are_shown_without_their_password(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("odd", ["#", "/", "?", "@", ":", "%", " ", "'"])
@pytest.mark.parametrize("port", ["5432", "99999", "port"])
def test_a_password_with_any_character_is_masked_and_scrubbed(odd, port):
    password = f"S3c{odd}ret"
    url = f"postgresql://user:{password}@db:{port}/optuna"
    assert redact_url(url) == f"postgresql://user:***@db:{port}/optuna"
    message = f"connection to {url} failed for password {password!r}"
    assert password not in scrub(message, url)


def test_a_state_round_trips_through_safetensors_without_pickle(tmp_path):
    import math
    import pickle

    import torch

    from stylepipe.train.checkpoints import read_state, write_state

    weight = torch.randn(3, 4)
    state = {"model": {"w": weight, "view": weight[0]}, "optimizer": {"state": {0: {"step": torch.tensor(5.0)}},
             "param_groups": [{"betas": (0.9, 0.999), "fused": None, "amsgrad": False, "params": [0]}]},
             "rng": torch.get_rng_state(), "history": [{"loss": float("nan"), "step": 1}], "step": 7}  # fmt: skip
    path = write_state(tmp_path / "state.safetensors", state)
    back = read_state(path)
    assert torch.equal(back["model"]["w"], weight) and torch.equal(back["model"]["view"], weight[0])
    assert list(back["optimizer"]["state"]) == [0] and back["optimizer"]["state"][0]["step"].item() == 5.0
    assert back["optimizer"]["param_groups"][0] == state["optimizer"]["param_groups"][0]  # a tuple stays one
    assert (
        torch.equal(back["rng"], state["rng"])
        and math.isnan(back["history"][0]["loss"])
        and back["step"] == 7
    )
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header: data, not a pickle
    with pytest.raises(TypeError, match="without pickle"):
        write_state(tmp_path / "other.safetensors", {"object": pickle})
    with pytest.raises(ValueError, match="not a state written by stylepipe"):
        read_state(tmp_path / "missing.safetensors")
