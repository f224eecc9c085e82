"""MAD competition: the four images that pit two metrics against each other.

For a reference image and two distance metrics, each metric is minimised and then
maximised while the other is held at the value it had on the starting image. The
four syntheses start from the same noisy copy of the reference image and run
together as four samples of one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import Checkpoint
from .optimize import (
    Constraint,
    OptimizationResult,
    Recorder,
    StopCriterion,
    optimize,
    range_penalty,
)

logger = logging.getLogger(__name__)

Metric = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Direction:
    """One of the four MAD syntheses: which metric is pushed, and which way."""

    optimized: str
    reference: str
    extremum: str  # "min" or "max"

    @property
    def label(self) -> str:
        """Short readable name, such as ``max mse``."""
        return f"{self.extremum} {self.optimized}"


@dataclass
class MADResult:
    """The four MAD images of one reference image and their metric values."""

    directions: list[Direction]
    mad_image: Tensor
    initial: Tensor
    reference_image: Tensor
    tradeoff: list[float]
    reference_target: Tensor
    final_optimized: Tensor
    final_reference: Tensor
    optimization: OptimizationResult


def per_sample(metric: Metric, reference: Tensor, images: Tensor) -> Tensor:
    """Evaluate ``metric`` between a reference and each image: one value per image.

    plenoptic's metrics return one value per image and channel; channels are
    averaged so that a colour image gets one distance.
    """
    value = metric(reference.expand_as(images), images)
    return value.reshape(images.shape[0], -1).mean(1)


def derive_tradeoff(
    optimized: Metric, reference: Metric, image: Tensor, seed: int
) -> float:
    """The trade-off weight plenoptic derives when none is given.

    Both metrics are evaluated between ``image`` and uniform noise; the weight is
    the power of ten nearest to their ratio. It balances the metrics' magnitudes,
    not the squared drift of the reference metric, so it can hold the reference
    metric loosely; the audit reports the drift.
    """
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(device=image.device, dtype=image.dtype)
    with torch.no_grad():
        ratio = per_sample(optimized, image, noise) / per_sample(
            reference, image, noise
        )
    return float(10 ** torch.round(torch.log10(ratio)).item())


def synthesize_mad(
    reference_image: Tensor,
    metrics: dict[str, Metric],
    seed: int,
    recorder: Recorder,
    *,
    max_iter: int,
    initial_noise: float = 0.1,
    hold: str = "projection",
    tradeoff: float | dict[str, float] | None = None,
    optimizer: dict[str, Any] | None = None,
    penalty_lambda: float = 0.1,
    stop: dict[str, Any] | None = None,
    snapshot_every: int = 0,
    initial: Tensor | None = None,
    checkpoint: Checkpoint | None = None,
) -> MADResult:
    """Synthesise the four MAD images of a metric pair around ``reference_image``.

    The objective of a direction is ``s * d_opt + penalty_lambda * penalty``, where
    ``s`` is +1 to minimise and -1 to maximise the optimized metric, while the
    reference metric is held at ``d_ref0``, its value on the starting image. With
    ``hold="projection"`` it is held as Wang and Simoncelli (2008) do: each step
    follows the gradient with its component along the reference metric's gradient
    removed, and is followed by a Newton step back to ``d_ref0``. With
    ``hold="penalty"`` it is held, as plenoptic does, by adding
    ``w * (d_ref - d_ref0)^2`` to the objective.

    Parameters
    ----------
    reference_image
        Shape (1, channel, y, x).
    metrics
        Exactly two named distance metrics, ``f(reference, images)``.
    seed
        Seed of the starting noise.
    recorder
        Receives the trajectory; samples are the four directions.
    max_iter
        Iterations after which the run stops.
    initial_noise
        Standard deviation of the Gaussian noise added to the reference image to
        make the starting image (then clamped to [0, 1]).
    hold
        ``projection`` or ``penalty``, how the reference metric is held.
    tradeoff
        With ``hold="penalty"``, the weight ``w`` (plenoptic's
        ``metric_tradeoff_lambda``): one number, or one per optimized metric
        name; derived per direction with :func:`derive_tradeoff` if None.
    optimizer, penalty_lambda, stop, snapshot_every
        As in :func:`~stimsynth.synthesis.metamer.synthesize_metamer`.
    initial
        The starting image (1, channel, y, x), used as given instead of the noisy
        reference image.
    checkpoint
        As in :func:`~stimsynth.synthesis.metamer.synthesize_metamer`.

    Returns
    -------
    result
        The four images and their metric values.
    """
    if len(metrics) != 2:
        raise ValueError(f"MAD needs exactly two metrics, got {list(metrics)}")
    first, second = metrics
    directions = [
        Direction(first, second, "min"),
        Direction(first, second, "max"),
        Direction(second, first, "min"),
        Direction(second, first, "max"),
    ]
    reference_image = reference_image.detach()
    if initial is None:
        noise = torch.randn(
            reference_image.shape, generator=torch.Generator().manual_seed(int(seed))
        ).to(device=reference_image.device, dtype=reference_image.dtype)
        # Clamped to the valid pixel range, so that metrics defined on [0, 1]
        # images (SSIM among them) see a valid image from the first iteration.
        start = (reference_image + initial_noise * noise).clamp(0, 1)
    else:
        start = initial.detach().to(reference_image)
    initial = start.expand(len(directions), *start.shape[1:]).clone()

    with torch.no_grad():
        reference_target = _metric_values(
            metrics, directions, reference_image, initial
        )[1]
    if hold not in ("projection", "penalty"):
        raise ValueError(f"hold {hold!r} is not known; use projection or penalty")
    weights = [_tradeoff(hold, tradeoff, d, metrics, start, seed) for d in directions]
    sign = torch.tensor([1.0 if d.extremum == "min" else -1.0 for d in directions])
    sign = sign.to(device=start.device, dtype=start.dtype)
    weight = torch.tensor(weights, device=start.device, dtype=start.dtype)

    reference_names = [d.reference for d in directions]

    def held_metric(images: Tensor) -> Tensor:
        return _metric_each(metrics, reference_names, reference_image, images)

    def objective(images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        optimized, held = _metric_values(metrics, directions, reference_image, images)
        penalty = range_penalty(images)
        value = (
            sign * optimized
            + weight * (held - reference_target).pow(2)
            + penalty_lambda * penalty
        )
        parts = {
            "optimized_metric": optimized,
            "reference_metric": held,
            "penalty": penalty,
        }
        return value, parts

    result = optimize(
        initial,
        objective,
        optimizer or {"name": "adam"},
        StopCriterion(max_iter=max_iter, **(stop or {})),
        recorder,
        snapshot_every=snapshot_every,
        checkpoint=checkpoint,
        description="mad",
        constraint=Constraint(held_metric, reference_target)
        if hold == "projection"
        else None,
    )
    with torch.no_grad():
        final_optimized, final_reference = _metric_values(
            metrics, directions, reference_image, result.variable
        )
    return MADResult(
        directions=directions,
        mad_image=result.variable,
        initial=start,
        reference_image=reference_image,
        tradeoff=weights,
        reference_target=reference_target,
        final_optimized=final_optimized,
        final_reference=final_reference,
        optimization=result,
    )


def _tradeoff(hold, tradeoff, direction, metrics, start, seed) -> float:
    """The penalty weight of one direction (0 when the hold is a projection)."""
    if hold == "projection":
        return 0.0
    if tradeoff is None:
        return derive_tradeoff(
            metrics[direction.optimized], metrics[direction.reference], start, seed
        )
    if isinstance(tradeoff, dict):
        if direction.optimized not in tradeoff:
            raise ValueError(
                f"tradeoff gives no weight for optimized metric "
                f"{direction.optimized!r}; give one for each of {sorted(metrics)}"
            )
        return float(tradeoff[direction.optimized])
    return float(tradeoff)


def _metric_values(
    metrics: dict[str, Metric],
    directions: list[Direction],
    reference_image: Tensor,
    images: Tensor,
) -> tuple[Tensor, Tensor]:
    """Optimized and reference metric of each direction's image."""
    optimized = [d.optimized for d in directions]
    reference = [d.reference for d in directions]
    return (
        _metric_each(metrics, optimized, reference_image, images),
        _metric_each(metrics, reference, reference_image, images),
    )


def _metric_each(
    metrics: dict[str, Metric],
    names: list[str],
    reference_image: Tensor,
    images: Tensor,
) -> Tensor:
    """Metric ``names[i]`` between the reference image and image ``i``."""
    values = [None] * len(names)
    for name in dict.fromkeys(names):
        index = [i for i, n in enumerate(names) if n == name]
        for i, value in zip(
            index,
            per_sample(metrics[name], reference_image, images[index]),
            strict=True,
        ):
            values[i] = value
    return torch.stack(values)
