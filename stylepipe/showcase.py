"""What the final model does to images, shown and measured: stylised samples, the triptych
(content | style | result on the showcase photo) and how far it moves images toward the style."""

from __future__ import annotations

from pathlib import Path

from stylepipe.config import Config
from stylepipe.search.study_data import StudyData


def write_samples(model, data: StudyData, folder: Path, count: int = 4) -> list[Path]:
    """Validation images beside the model's output for them, one PNG each."""
    from torchvision.utils import save_image

    from stylepipe.stylize import stylize_tensor

    folder.mkdir(parents=True, exist_ok=True)
    images = data.val_images[:count].to(data.device).float().div(255)
    styled = stylize_tensor(model.eval(), images)
    paths = []
    for i, (source, output) in enumerate(zip(images, styled, strict=True)):
        paths.append(folder / f"sample_{i}.png")
        save_image([source.cpu(), output.cpu()], paths[-1], nrow=2, padding=2)
    return paths


JUDGE_SEED_OFFSET = 1234  # the judge's random weights: never the seed the model trained against


def measure_style(model, data: StudyData, config: Config, count: int = 16) -> dict[str, float]:
    """How far the model moves validation images toward the style image (nets/losses.py's
    ``style_distances``). Texture is judged at relu1_2: with random weights, by another seed's
    network than the one the model trained against, so the measure is not its training loss;
    with real weights, by the same network, at that one layer."""
    import torch

    from stylepipe.data.decode import resize_crop
    from stylepipe.data.sources import load_image
    from stylepipe.nets.losses import style_distances
    from stylepipe.nets.vgg import LossNetwork, load_vgg16_features
    from stylepipe.stylize import stylize_tensor

    device = next(model.parameters()).device
    weights = config.loss.vgg_weights
    judge = LossNetwork(
        load_vgg16_features(weights, seed=config.train.seed + JUDGE_SEED_OFFSET, warn=False), ["relu1_2"]
    ).to(device)
    images = data.val_images[:count].to(device).float().div(255)
    style = resize_crop(load_image(config.data.style_image), images.shape[-1]).to(device).float().div(255)
    with torch.no_grad():
        outputs = stylize_tensor(model.eval(), images)
    return style_distances(images, outputs, style, judge)


def style_summary(style: dict[str, float]) -> str:
    return (
        f"texture x{style['texture_ratio']:.2f}, palette x{style['palette_ratio']:.2f} of the inputs' "
        "distance to the style image (1: unchanged; lower: more stylised)"
    )


def write_triptych(model, config: Config, path: Path) -> Path:
    """The final model on the showcase photo, beside the style image: content | style | result."""
    import numpy as np
    import torch
    from torchvision.transforms.functional import to_pil_image, to_tensor

    from stylepipe.data.sources import load_image
    from stylepipe.report import triptych
    from stylepipe.stylize import stylize_tensor

    size = config.final.showcase_size
    content = load_image(config.final.showcase_image)
    content.thumbnail((size, size))
    style = load_image(config.data.style_image).resize(content.size)
    device = next(model.parameters()).device
    with torch.no_grad():
        result = stylize_tensor(model.eval(), to_tensor(content).unsqueeze(0).to(device))[0].cpu()
    styled = np.asarray(to_pil_image(result))
    caption = (
        f"{config.name}: final model, {config.final_run_steps} steps at {config.final_run_image_size} px, "
        f"loss network {config.loss.vgg_weights}"
    )
    return triptych(np.asarray(content), np.asarray(style), styled, path, caption)
