"""Small models and metrics that break one rule each, for the input checks' tests.

Each is importable by path, as a study names it: for instance
``target: tests.helpers.bad_models:NonDeterministic`` (with the repository root on
``sys.path``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class Good(nn.Module):
    """A model that passes every check: a smooth function of each pixel."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(4 * x - 2)


class NonFinite(nn.Module):
    """Its output is infinite wherever a pixel is 0.5 or less."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x - 0.5)


class NonDeterministic(nn.Module):
    """Adds fresh noise on every call."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.01 * torch.randn_like(x)


class ThroughNumpy(nn.Module):
    """Computes through numpy, so that no gradient reaches the image."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(np.tanh(x.detach().cpu().numpy()))


class Rounding(nn.Module):
    """Differentiable in name only: the gradient of rounding is zero."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(4 * x)


class BatchCoupled(nn.Module):
    """Normalises by the mean of the whole batch, so images are not independent."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.mean()


class ReturnsDict(nn.Module):
    """Returns a dict of tensors rather than one tensor."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": x}


class WholeBatch(nn.Module):
    """Returns one number for the whole batch."""

    def forward(self, x: Tensor) -> Tensor:
        return x.pow(2).sum()


class GrayOnly(nn.Module):
    """A convolution with one input channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ColourOnly(nn.Module):
    """A convolution with three input channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Pyramid(nn.Module):
    """plenoptic's steerable pyramid, built for one image shape, as one tensor."""

    def __init__(self, image_shape: tuple[int, int], height: int = 2):
        super().__init__()
        from plenoptic.process import SteerablePyramidFreq

        self.pyramid = SteerablePyramidFreq(image_shape, height=height)

    def forward(self, x: Tensor) -> Tensor:
        coefficients = self.pyramid(x)
        return torch.cat([c.flatten(1) for c in coefficients.values()], dim=1)


def broken_factory(width: int = 4) -> nn.Module:
    """A model factory whose construction fails."""
    raise ValueError(f"width {width} is not supported")


def float_metric(x: Tensor, y: Tensor) -> float:
    """A metric that returns a Python float."""
    return float((x - y).pow(2).mean())


def numpy_metric(x: Tensor, y: Tensor) -> Tensor:
    """A metric computed through numpy: it has no gradient."""
    value = ((x.detach().numpy() - y.detach().numpy()) ** 2).mean(axis=(1, 2, 3))
    return torch.from_numpy(value)


def nan_metric(x: Tensor, y: Tensor) -> Tensor:
    """A metric that is NaN everywhere."""
    return (x - y).mean(dim=(1, 2, 3)) * float("nan")


class ScaledMSE:
    """A metric class: mean squared error times a scale fixed when it is built."""

    def __init__(self, scale: float = 1.0):
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.scale * (x - y).pow(2).mean(dim=(1, 2, 3))


_calls = {"count": 0}


def loss_that_turns_nan(representation: Tensor, target: Tensor) -> Tensor:
    """Mean squared difference for 30 calls in a process, NaN after: a run whose
    objective becomes NaN part-way, as one that diverges does."""
    _calls["count"] += 1
    value = (representation - target).pow(2).mean()
    return value if _calls["count"] <= 30 else value * float("nan")
