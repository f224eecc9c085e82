"""Metamers: images whose model representation matches a target image's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .optimize import (
    OptimizationResult,
    Recorder,
    StopCriterion,
    optimize,
    range_penalty,
)

logger = logging.getLogger(__name__)


@dataclass
class MetamerResult:
    """A finished metamer synthesis, one sample per seed."""

    metamer: Tensor
    initial: Tensor
    target: Tensor
    initial_loss: Tensor
    final_loss: Tensor
    optimization: OptimizationResult


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> Tensor:
    """Uniform noise in [0, 1), one image per seed, drawn on the CPU.

    Drawing on the CPU with a generator per seed makes the starting image depend on
    the seed alone, not on the device or on which other seeds share the batch.

    Parameters
    ----------
    shape
        Shape of one image, (channel, y, x).
    seeds
        One seed per sample.

    Returns
    -------
    noise
        Shape (len(seeds), *shape), float32.
    """
    images = [
        torch.rand(shape, generator=torch.Generator().manual_seed(int(seed)))
        for seed in seeds
    ]
    return torch.stack(images)


def representation_loss(representation: Tensor, target: Tensor) -> Tensor:
    """Mean squared difference of two representations, per sample."""
    return (representation - target).pow(2).flatten(1).mean(1)


def l2_loss(representation: Tensor, target: Tensor) -> Tensor:
    """Euclidean distance between two representations, per sample."""
    return torch.linalg.vector_norm((representation - target).flatten(1), dim=1)


#: Losses known by name; any other must be an import path.
LOSSES = ("mse", "l2", "portilla_simoncelli")


def make_loss(
    name: str, model: torch.nn.Module, target: Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    """The representation loss of a metamer run, giving one value per sample.

    Parameters
    ----------
    name
        ``mse`` (mean squared difference), ``l2`` (Euclidean distance),
        ``portilla_simoncelli`` (plenoptic's reweighted loss for that model, which
        ignores the pixel minimum and maximum and weights the high-pass variance up),
        or the import path of a function ``loss(representation, target)``.
    model
        The model, which a loss factory may need.
    target
        The target image, which a loss factory may need.

    Returns
    -------
    loss
        Maps (representation, target representation) to one value per sample.
    """
    if name == "mse":
        return representation_loss
    if name == "l2":
        return l2_loss
    if name == "portilla_simoncelli":
        import plenoptic as po

        if not hasattr(model, "convert_to_dict"):
            raise InputError(
                f"loss portilla_simoncelli needs a PortillaSimoncelli model, not "
                f"{type(model).__name__}; use loss: mse or l2"
            )
        return _per_sample(po.loss.portilla_simoncelli_loss_factory(model, target))
    from ..models import resolve_target

    return _per_sample(resolve_target(name))


def _per_sample(loss: Callable[[Tensor, Tensor], Tensor]):
    """Apply a loss that reduces over its whole batch to one sample at a time."""

    def per_sample(representation: Tensor, target: Tensor) -> Tensor:
        return torch.stack(
            [
                loss(representation[i : i + 1], target).reshape(())
                for i in range(len(representation))
            ]
        )

    return per_sample


def initial_images(
    kind: str, target: Tensor, seeds: list[int], scale: float = 0.01
) -> Tensor:
    """Starting images of a metamer run, one per seed.

    ``uniform`` is noise uniform in [0, 1); ``gray`` is the target's mean pixel value
    plus ``scale`` times that noise, a start close to the middle of the pixel range
    that texture models converge from more cleanly.
    """
    noise = initial_noise(tuple(target.shape[1:]), seeds)
    if kind == "uniform":
        return noise
    if kind == "gray":
        return target.mean().cpu() + scale * noise
    raise ValueError(f"initial image {kind!r} is not known; use uniform or gray")


def synthesize_metamer(
    model: torch.nn.Module,
    target: Tensor,
    seeds: list[int],
    recorder: Recorder,
    *,
    max_iter: int,
    optimizer: dict[str, Any] | None = None,
    penalty_lambda: float = 0.1,
    stop: dict[str, Any] | None = None,
    snapshot_every: int = 0,
    loss: str = "mse",
    initial: str | Tensor = "uniform",
) -> MetamerResult:
    """Synthesise one metamer per seed of ``target`` for ``model``.

    The objective of a sample is the loss between its representation and the
    target's (by default their mean squared difference), plus ``penalty_lambda``
    times the squared excursion of its pixels outside [0, 1].

    Parameters
    ----------
    model
        Maps images (samples, channel, y, x) to representations (samples, ...).
    target
        Target image, shape (1, channel, y, x).
    seeds
        One metamer is synthesised per seed, all in one batch.
    recorder
        Receives the trajectory.
    max_iter
        Iterations after which the run stops.
    optimizer
        Optimiser spec, default Adam with lr 0.01 and amsgrad.
    penalty_lambda
        Weight of the range penalty.
    stop
        Convergence settings, keyword arguments of :class:`StopCriterion`.
    snapshot_every
        Keep the images every this many iterations (0: never).
    loss
        Representation loss, see :func:`make_loss`.
    initial
        ``uniform`` or ``gray`` (see :func:`initial_images`), or the starting images
        themselves, (samples, channel, y, x).

    Returns
    -------
    result
        The metamers and how their synthesis ended.
    """
    target = target.detach()
    with torch.no_grad():
        target_representation = model(target)
    loss_function = make_loss(loss, model, target)
    if isinstance(initial, str):
        initial = initial_images(initial, target, seeds)
    initial = initial.to(device=target.device, dtype=target.dtype)

    def objective(images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        value = loss_function(model(images), target_representation)
        penalty = range_penalty(images)
        return value + penalty_lambda * penalty, {"loss": value, "penalty": penalty}

    result = optimize(
        initial,
        objective,
        optimizer or {"name": "adam"},
        StopCriterion(max_iter=max_iter, **(stop or {})),
        recorder,
        snapshot_every=snapshot_every,
        description="metamer",
    )
    with torch.no_grad():
        initial_loss = loss_function(model(initial), target_representation)
        final_loss = loss_function(model(result.variable), target_representation)
    return MetamerResult(
        metamer=result.variable,
        initial=initial,
        target=target,
        initial_loss=initial_loss,
        final_loss=final_loss,
        optimization=result,
    )
