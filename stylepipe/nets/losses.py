"""Perceptual losses: content MSE, style MSE between Gram matrices, total variation.

The Gram matrix is computed in float32 even under autocast. In fp16 a Gram matrix
is a sum over every spatial position (65,536 at relu1_2 for a 256 px image), which
overflows fp16's 65,504 maximum long before the division that normalises it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stylepipe.nets.vgg import LossNetwork


def gram_matrix(features: torch.Tensor, force_fp32: bool = True) -> torch.Tensor:
    """Batch of normalised Gram matrices, ``F F^T / (C H W)``, shape (B, C, C)."""
    b, c, h, w = features.shape
    if not force_fp32:  # follows autocast: reproduces the fp16 overflow
        flat = features.reshape(b, c, h * w)
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)
    with torch.autocast(device_type=features.device.type, enabled=False):
        flat = features.float().reshape(b, c, h * w)
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


@dataclass
class LossTerms:
    """Unweighted loss components for one batch; every field is a 0-d tensor."""

    content: torch.Tensor
    style_by_layer: dict[str, torch.Tensor]
    tv: torch.Tensor

    @property
    def style(self) -> torch.Tensor:
        return torch.stack(list(self.style_by_layer.values())).sum()


class PerceptualLoss(nn.Module):
    """Compares a stylised batch with its content batch and one fixed style image."""

    def __init__(
        self,
        loss_network: LossNetwork,
        style_image: torch.Tensor,
        content_layers: list[str],
        style_layers: list[str],
        gram_fp32: bool = True,
    ):
        super().__init__()
        self.net = loss_network
        self.content_layers = list(content_layers)
        self.style_layers = list(style_layers)
        self.gram_fp32 = gram_fp32
        with torch.no_grad():
            feats = self.net(style_image.float().unsqueeze(0) if style_image.dim() == 3 else style_image)
            for name in self.style_layers:
                self.register_buffer(f"style_gram_{name}", gram_matrix(feats[name]), persistent=False)

    def style_target(self, layer: str) -> torch.Tensor:
        return getattr(self, f"style_gram_{layer}")

    def forward(self, output: torch.Tensor, content: torch.Tensor) -> LossTerms:
        out_feats = self.net(output)
        with torch.no_grad():  # the content target needs only the content layers
            content_feats = self.net(content, self.content_layers)
        content_loss = torch.stack(
            [F.mse_loss(out_feats[n].float(), content_feats[n].float()) for n in self.content_layers]
        ).sum()
        style_by_layer = {}
        for name in self.style_layers:
            gram = gram_matrix(out_feats[name], force_fp32=self.gram_fp32)
            target = self.style_target(name).to(gram.dtype).expand_as(gram)
            style_by_layer[name] = F.mse_loss(gram.float(), target.float())
        return LossTerms(content_loss, style_by_layer, total_variation(output.float()))


# ---------------------------------------------------------------- how far from the style
# Measures of what a person sees, for judging a trained model (not for training it). Both
# compare a batch of images with the style image; lower is closer to the style.


@torch.no_grad()
def gram_distance(
    images: torch.Tensor, style: torch.Tensor, network: LossNetwork, layer: str = "relu1_2"
) -> float:
    """Texture: the distance between each image's Gram matrix at ``layer`` and the style's,
    relative to the style's, averaged over the images. Judge with a loss network other than
    the one the model trained against (another seed of random weights, or ImageNet's), so the
    measure is not the training loss itself."""
    target = gram_matrix(network(style.unsqueeze(0) if style.dim() == 3 else style, [layer])[layer])
    grams = gram_matrix(network(images, [layer])[layer])
    return float(((grams - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)).mean())


@torch.no_grad()
def colour_distance(images: torch.Tensor, style: torch.Tensor, directions: int = 64, seed: int = 0) -> float:
    """Palette: the sliced Wasserstein-1 distance between the images' RGB pixels and the
    style's, in [0, 1] units. Whole distributions, not means and covariances: those can call
    a garish image close to a soft one."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.randn(directions, 3, generator=generator)
    axes /= axes.norm(dim=1, keepdim=True)
    ours = images.float().permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    theirs = style.float().reshape(3, -1).T.cpu()
    count = min(len(ours), len(theirs))
    ours = ours[torch.randperm(len(ours), generator=generator)[:count]]
    theirs = theirs[torch.randperm(len(theirs), generator=generator)[:count]]
    return float(((ours @ axes.T).sort(0).values - (theirs @ axes.T).sort(0).values).abs().mean())


@torch.no_grad()
def style_distances(
    inputs: torch.Tensor, outputs: torch.Tensor, style: torch.Tensor, judge: LossNetwork
) -> dict[str, float]:
    """How far a model moved its inputs toward the style image: the texture and palette
    distances of the inputs and of the outputs, and their ratio (outputs / inputs: 1 is
    unchanged, lower is closer to the style). Images in [0, 1]."""
    distances = {
        "texture": (gram_distance(inputs, style, judge), gram_distance(outputs, style, judge)),
        "palette": (colour_distance(inputs, style), colour_distance(outputs, style)),
    }
    found = {}
    for measure, (before, after) in distances.items():
        found |= {
            f"{measure}_inputs": before,
            f"{measure}_outputs": after,
            f"{measure}_ratio": after / before if before > 0 else float("nan"),
        }
    return found
