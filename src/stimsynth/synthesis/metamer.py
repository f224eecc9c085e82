"""Metamers: images whose model representation matches a target image's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import Checkpoint
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
    #: Coarse-to-fine stages in the order they ran (empty without coarse-to-fine).
    stages: list[str] = field(default_factory=list)
    #: Iteration at which each stage started; a stage never reached has -1.
    stage_start: list[int] = field(default_factory=list)


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


#: Penalties known by name; any other must be an import path.
PENALTIES = ("range",)


def make_penalty(name: str) -> Callable[[Tensor], Tensor]:
    """The penalty on the image of a metamer run, giving one value per sample.

    Parameters
    ----------
    name
        ``range`` (the sum of squared excursions of pixels outside [0, 1]) or the
        import path of a function ``penalty(image)`` of one image (1, channel, y, x)
        returning a scalar, as plenoptic's ``penalty_function``.

    Returns
    -------
    penalty
        Maps images (samples, channel, y, x) to one value per sample.
    """
    if name == "range":
        return range_penalty
    from ..models import resolve_target

    function = resolve_target(name)

    def per_sample(images: Tensor) -> Tensor:
        return torch.stack(
            [function(images[i : i + 1]).reshape(()) for i in range(len(images))]
        )

    return per_sample


@dataclass(frozen=True)
class CoarseToFine:
    """Coarse-to-fine synthesis over a model's scales, as plenoptic's MetamerCTF.

    The model must have a ``scales`` attribute (coarsest first, as
    plenoptic's PortillaSimoncelli lists them) and take a ``scales`` keyword that
    restricts its output to those scales. The run steps along the loss of one
    stage at a time: each scale but the last in turn (``together``: with the
    scales already finished; ``separate``: alone, the last scale included), then
    all scales at once. A stage ends once it has run ``window`` iterations and
    its objective changed by less than ``change_tol`` over the last ``window``
    (or, with ``change_tol`` None, as soon as it has run ``window`` iterations).
    The learning rate returns to its starting value at every new stage. The run
    may be judged converged only in the final stage, after at least ``window``
    iterations and two convergence windows there.

    Parameters
    ----------
    mode
        ``together`` or ``separate``.
    change_tol
        Absolute change of a stage's objective over ``window`` iterations below
        which the stage ends.
    window
        Fewest iterations of a stage, and the span over which its change is taken.
    """

    mode: str = "together"
    change_tol: float | None = 1e-2
    window: int = 50

    def __post_init__(self) -> None:
        if self.mode not in ("together", "separate"):
            raise ValueError(
                f"coarse-to-fine mode {self.mode!r} is not known; use together or "
                "separate"
            )
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")

    def stages(self, model: torch.nn.Module) -> list:
        """The stages a run goes through, the last being ``"all"``."""
        scales = getattr(model, "scales", None)
        if not scales:
            raise InputError(
                f"coarse-to-fine needs a model with a scales attribute, and "
                f"{type(model).__name__} has none; use a model with scales (such "
                "as PortillaSimoncelli) or leave coarse_to_fine out"
            )
        stages = list(scales[:-1])
        if self.mode == "separate":
            stages.append(scales[-1])
        return [*stages, "all"]


class _ScaleSchedule:
    """Moves a coarse-to-fine run from stage to stage (see :class:`CoarseToFine`)."""

    def __init__(self, ctf: CoarseToFine, stages: list, stop: StopCriterion):
        self.ctf = ctf
        self.stages = stages
        self.stage = 0
        self.stage_start = [0]
        self._stage_objective: list[float] = []
        self._final_span = max(ctf.window, 2 * stop.window)

    @property
    def final(self) -> bool:
        return self.stage == len(self.stages) - 1

    def scales(self) -> list | None:
        """The scales the current stage optimises; None for all of them."""
        if self.final:
            return None
        current = [self.stages[self.stage]]
        if self.ctf.mode == "together":
            return current + self.stages[: self.stage]
        return current

    def record(self) -> dict[str, np.ndarray]:
        return {"stage": np.int64(self.stage)}

    def update(self, iteration, scalars, optimizer) -> None:
        self._stage_objective.append(float(np.nansum(scalars["stage_objective"])))
        if self.final:
            return
        window = self.ctf.window
        ran = iteration + 1 - self.stage_start[-1]
        history = self._stage_objective
        if ran < window or len(history) < window:
            return
        if self.ctf.change_tol is not None and not (
            abs(history[-1] - history[-window]) < self.ctf.change_tol
        ):
            return
        self.stage += 1
        self.stage_start.append(iteration + 1)
        for group, lr in zip(optimizer.param_groups, self._initial_lr, strict=True):
            group["lr"] = lr
        logger.info(
            "coarse-to-fine: stage %s starts at iteration %d",
            self.stages[self.stage],
            iteration + 1,
        )

    def start(self, optimizer) -> None:
        self._initial_lr = [group["lr"] for group in optimizer.param_groups]

    def may_stop(self, iteration: int) -> bool:
        return self.final and iteration + 1 - self.stage_start[-1] >= self._final_span

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stage_start": list(self.stage_start),
            "stage_objective": list(self._stage_objective),
            "initial_lr": list(self._initial_lr),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
        self.stage_start = list(state["stage_start"])
        self._stage_objective = list(state["stage_objective"])
        self._initial_lr = list(state["initial_lr"])


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
    penalty: str = "range",
    coarse_to_fine: CoarseToFine | None = None,
    checkpoint: Checkpoint | None = None,
) -> MetamerResult:
    """Synthesise one metamer per seed of ``target`` for ``model``.

    The objective of a sample is the loss between its representation and the
    target's (by default their mean squared difference), plus ``penalty_lambda``
    times a penalty on its pixels (by default their squared excursion outside
    [0, 1]).

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
        Weight of the penalty.
    stop
        Convergence settings, keyword arguments of :class:`StopCriterion`.
    snapshot_every
        Keep the images every this many iterations (0: never).
    loss
        Representation loss, see :func:`make_loss`.
    initial
        ``uniform`` or ``gray`` (see :func:`initial_images`), or the starting images
        themselves, (samples, channel, y, x).
    penalty
        ``range`` or the import path of a penalty function, see
        :func:`make_penalty`.
    coarse_to_fine
        Step along one scale of the model at a time before all of them, see
        :class:`CoarseToFine`.
    checkpoint
        Where the run saves its state as it goes and resumes from after a
        restart, see :func:`~stimsynth.synthesis.optimize.optimize`.

    Returns
    -------
    result
        The metamers and how their synthesis ended.
    """
    target = target.detach()
    with torch.no_grad():
        target_representation = model(target)
    loss_function = make_loss(loss, model, target)
    penalty_function = make_penalty(penalty)
    if isinstance(initial, str):
        initial = initial_images(initial, target, seeds)
    initial = initial.to(device=target.device, dtype=target.dtype)
    stop_criterion = StopCriterion(max_iter=max_iter, **(stop or {}))

    def full_objective(images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        value = loss_function(model(images), target_representation)
        penalty = penalty_function(images)
        return value + penalty_lambda * penalty, {"loss": value, "penalty": penalty}

    schedule = None
    objective = full_objective
    if coarse_to_fine is not None:
        if loss == "portilla_simoncelli":
            raise InputError(
                "coarse-to-fine cannot use loss portilla_simoncelli, whose weights "
                "are laid out for the whole representation; use loss: l2 or mse"
            )
        schedule = _ScaleSchedule(
            coarse_to_fine, coarse_to_fine.stages(model), stop_criterion
        )
        targets: dict[int, Tensor] = {}

        def objective(images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            scales = schedule.scales()
            if scales is None:
                value, parts = full_objective(images)
                return value, {**parts, "stage_objective": value}
            if schedule.stage not in targets:
                with torch.no_grad():
                    targets[schedule.stage] = model(target, scales=scales)
            penalty = penalty_function(images)
            stage_loss = loss_function(
                model(images, scales=scales), targets[schedule.stage]
            )
            stage_value = stage_loss + penalty_lambda * penalty
            # What the run is judged on is the loss over all scales.
            with torch.no_grad():
                value, parts = full_objective(images)
            return stage_value, {
                "objective": value,
                **parts,
                "stage_objective": stage_value,
            }

    result = optimize(
        initial,
        objective,
        optimizer or {"name": "adam"},
        stop_criterion,
        recorder,
        snapshot_every=snapshot_every,
        description="metamer",
        schedule=schedule,
        checkpoint=checkpoint,
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
        stages=[str(stage) for stage in schedule.stages] if schedule else [],
        stage_start=(schedule.stage_start + [-1] * len(schedule.stages))[
            : len(schedule.stages)
        ]
        if schedule
        else [],
    )
