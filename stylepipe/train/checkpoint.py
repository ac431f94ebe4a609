"""Checkpoints: the transformer's weights as safetensors, with the settings beside them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from stylepipe.errors import StylepipeError
from stylepipe.files import atomic_path, read_state_dict
from stylepipe.nets.transformer import TransformerNet


class CheckpointError(StylepipeError):
    """A checkpoint that cannot be read as a stylepipe transformer."""


def save_checkpoint(model: TransformerNet, path: str | Path, metadata: dict | None = None) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"stylepipe": json.dumps(metadata or {}, default=str)})
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TransformerNet:
    """A TransformerNet from a safetensors file or a ``weights_only`` torch state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    try:
        state = read_state_dict(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    model = TransformerNet()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError) as err:  # a tensor of the wrong shape
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path} is not a stylepipe TransformerNet checkpoint: {first}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a stylepipe TransformerNet checkpoint: {len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected (such as {(missing or unexpected)[0]})"
        )
    return model.to(device).eval()
