"""Metamers: images whose model representation matches a target image's."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .optimize import OptimizationResult, Recorder, StopCriterion, optimize, range_penalty

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
    initial: Tensor | None = None,
) -> MetamerResult:
    """Synthesise one metamer per seed of ``target`` for ``model``.

    The objective of a sample is the mean squared difference between its
    representation and the target's, plus ``penalty_lambda`` times the squared
    excursion of its pixels outside [0, 1].

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
    initial
        Starting images (samples, channel, y, x); uniform noise per seed if None.

    Returns
    -------
    result
        The metamers and how their synthesis ended.
    """
    target = target.detach()
    with torch.no_grad():
        target_representation = model(target)
    if initial is None:
        initial = initial_noise(tuple(target.shape[1:]), seeds)
    initial = initial.to(device=target.device, dtype=target.dtype)

    def objective(images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = representation_loss(model(images), target_representation)
        penalty = range_penalty(images)
        return loss + penalty_lambda * penalty, {"loss": loss, "penalty": penalty}

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
        initial_loss = representation_loss(model(initial), target_representation)
        final_loss = representation_loss(model(result.variable), target_representation)
    return MetamerResult(
        metamer=result.variable,
        initial=initial,
        target=target,
        initial_loss=initial_loss,
        final_loss=final_loss,
        optimization=result,
    )
