"""The image transformation network of Johnson et al. (2016).

9x9 conv 3->32, two stride-2 3x3 convs to 64 and 128, five residual blocks of
128, two nearest-upsample + conv stages back to 64 and 32, and a 9x9 conv to 3.
Reflection padding and instance norm throughout. Images go in and out in [0, 1].

Parameters are grouped by stage (``PARAMETER_GROUPS``) so the trainer can report a
gradient norm per stage: the first and last groups show vanishing gradients.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvLayer(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, norm: bool = True):
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(kernel // 2),
            nn.Conv2d(in_ch, out_ch, kernel, stride),
        ]
        if norm:
            layers += [nn.InstanceNorm2d(out_ch, affine=True), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UpsampleConv(nn.Sequential):
    """Nearest-neighbour upsampling then a conv: avoids transposed-conv checkerboards."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvLayer(in_ch, out_ch, 3))


class TransformerNet(nn.Module):
    PARAMETER_GROUPS = ("encoder_in", "encoder_down", "residual", "decoder_up", "decoder_out")

    def __init__(self, residual_blocks: int = 5):
        super().__init__()
        self.encoder_in = ConvLayer(3, 32, 9)
        self.encoder_down = nn.Sequential(ConvLayer(32, 64, 3, stride=2), ConvLayer(64, 128, 3, stride=2))
        self.residual = nn.Sequential(*(ResidualBlock(128) for _ in range(residual_blocks)))
        self.decoder_up = nn.Sequential(UpsampleConv(128, 64), UpsampleConv(64, 32))
        self.decoder_out = ConvLayer(32, 3, 9, norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder_in(x)
        x = self.encoder_down(x)
        x = self.residual(x)
        x = self.decoder_up(x)
        return self.decoder_out(x)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {name: list(getattr(self, name).parameters()) for name in self.PARAMETER_GROUPS}
