"""Networks and losses: the image transformer, the frozen VGG16 loss network, the losses."""

from stylepipe.nets.losses import PerceptualLoss, gram_matrix, total_variation
from stylepipe.nets.transformer import TransformerNet
from stylepipe.nets.vgg import LossNetwork, WeightsUnavailable, load_vgg16_features

__all__ = [
    "LossNetwork",
    "PerceptualLoss",
    "TransformerNet",
    "WeightsUnavailable",
    "gram_matrix",
    "load_vgg16_features",
    "total_variation",
]
