"""The model file: a trained transformer's weights as safetensors, with its settings beside them.

A *model* is what a finished run leaves (and what ``stylize`` and the registry take); a
*checkpoint* is only the state a run resumes from (``checkpoints.py``). A model file is written
only when every weight is finite, and one that is not finite is refused when read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from stylepipe.errors import StylepipeError
from stylepipe.files import atomic_path, read_state_dict
from stylepipe.nets.transformer import TransformerNet

MODEL_FILE = "model.safetensors"  # a run folder's model


class ModelFileError(StylepipeError):
    """A model file that cannot be written or used as a stylepipe transformer."""


def _nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_model(model: TransformerNet, path: str | Path, metadata: dict | None = None) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a model; refused
    (``ModelFileError``, nothing written) when a weight is NaN or Inf."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = _nonfinite(state)
    if bad:
        raise ModelFileError(
            f"the model was not written to {path}: {len(bad)} of its {len(state)} tensors hold "
            f"NaN or Inf (such as {bad[0]})"
        )
    body = save(state, metadata={"stylepipe": json.dumps(metadata or {}, default=str)})
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(body)
    except OSError as err:
        raise ModelFileError(f"cannot write the model {path}: {err.strerror or err}") from None
    return Path(path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TransformerNet:
    """A TransformerNet from a safetensors file or a ``weights_only`` torch state_dict; a run
    folder stands for the model in it."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise ModelFileError(
                f"{path} is a folder without a {MODEL_FILE}: give the model file (a finished "
                "run's folder holds one)"
            )
        path = path / MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        state = read_state_dict(path)
    except (OSError, ValueError) as err:
        raise ModelFileError(f"cannot read the model {path}: {err}") from None
    model = TransformerNet()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError) as err:  # a tensor of the wrong shape
        first = str(err).strip().splitlines()[-1].strip()
        raise ModelFileError(f"{path} is not a stylepipe TransformerNet model: {first}") from None
    if missing or unexpected:
        raise ModelFileError(
            f"{path} is not a stylepipe TransformerNet model: {len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected (such as {(missing or unexpected)[0]})"
        )
    bad = _nonfinite(state)
    if bad:
        raise ModelFileError(
            f"{path} is not a usable model: {len(bad)} of its {len(state)} tensors hold NaN or "
            f"Inf (such as {bad[0]}); it would paint every image black"
        )
    return model.to(device).eval()
