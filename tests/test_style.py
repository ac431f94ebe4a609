"""Training does what it claims: the trained model's outputs are closer to the style image than
its inputs were, by the texture (Gram matrices of a loss network the model never saw) and by
the palette (the whole distribution of pixel colours). With the style loss off, they are not."""

from __future__ import annotations

import pytest
import torch

from stylepipe.config import load_config
from stylepipe.data.decode import resize_crop
from stylepipe.data.sources import load_content_images, load_image
from stylepipe.nets.losses import colour_distance, gram_distance, style_distances
from stylepipe.nets.vgg import LossNetwork, load_vgg16_features
from stylepipe.train.model_file import load_model
from stylepipe.train.recipe import train_from_config
from tests.helpers import DEMO

SIZE = 32
STEPS = 80
STYLE = "generated:strokes"


def trained_distances(run_dir, style_weight: float) -> dict[str, tuple[float, float]]:
    config = load_config(DEMO, [
        f"run_dir={run_dir}", "data.content=skimage", f"data.image_size={SIZE}", f"data.style_image={STYLE}",
        f"train.steps={STEPS}", "train.batch_size=4", "train.device=cpu", "train.checkpoint_every=1000",
        "loss.content_weight=1.0", f"loss.style_weight={style_weight}",
    ])  # fmt: skip
    model = load_model(train_from_config(config).model).eval()
    images = load_content_images("skimage", SIZE).float().div(255)
    style = resize_crop(load_image(STYLE), SIZE).float().div(255)
    judge = LossNetwork(load_vgg16_features("random", seed=1234), ["relu1_2"])  # training used seed 0
    with torch.no_grad():
        outputs = model(images).clamp(0, 1)
    found = style_distances(images, outputs, style, judge)
    return {
        measure: (found[f"{measure}_inputs"], found[f"{measure}_outputs"])
        for measure in ("texture", "palette")
    }


@pytest.mark.slow
def test_training_moves_the_outputs_toward_the_style_and_not_without_the_style_loss(tmp_path):
    styled = trained_distances(tmp_path / "styled", style_weight=1e5)  # the demo's weight
    for measure, (before, after) in styled.items():
        assert after < 0.5 * before, f"{measure}: inputs {before:.3f}, outputs {after:.3f}"

    unstyled = trained_distances(tmp_path / "unstyled", style_weight=0.0)
    for measure, (before, after) in unstyled.items():
        assert after > 0.7 * before, f"{measure} dropped without a style loss: {before:.3f} -> {after:.3f}"


def test_the_measures_tell_the_style_from_a_photo():
    photo = resize_crop(load_image("skimage:astronaut"), 64).float().div(255).unsqueeze(0)
    style = resize_crop(load_image(STYLE), 64).float().div(255)
    judge = LossNetwork(load_vgg16_features("random", seed=1234), ["relu1_2"])
    assert gram_distance(style.unsqueeze(0), style, judge) < 1e-6
    assert colour_distance(style.unsqueeze(0), style) < 1e-6
    assert gram_distance(photo, style, judge) > 0.2
    assert colour_distance(photo, style) > 0.05


class _Fixed(torch.nn.Module):
    """A stand-in model: gives back its input (``style=None``) or the style image, whatever the input."""

    def __init__(self, style: torch.Tensor | None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # a device to be found on
        self.style = style

    def forward(self, x):
        return x * self.scale if self.style is None else self.style.expand(len(x), -1, -1, -1)


def test_the_final_models_style_measure_is_1_for_no_change_and_0_for_the_style_itself():
    from types import SimpleNamespace

    from stylepipe.showcase import measure_style

    config = load_config(DEMO, [f"data.style_image={STYLE}"])
    data = SimpleNamespace(val_images=load_content_images("skimage", SIZE)[:8])
    unchanged = measure_style(_Fixed(None), data, config)
    assert unchanged["texture_ratio"] == pytest.approx(1.0) and unchanged["palette_ratio"] == pytest.approx(
        1.0
    )
    assert unchanged["texture_inputs"] > 0.2 and unchanged["palette_inputs"] > 0.05
    copied = measure_style(_Fixed(resize_crop(load_image(STYLE), SIZE).float().div(255)), data, config)
    assert copied["texture_ratio"] < 1e-3 and copied["palette_ratio"] < 0.05  # palette: sampled pixels
