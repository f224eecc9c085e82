"""Representational geodesics: shortest paths between two images in a model's space.

A path is ``n_steps + 1`` frames whose first and last are the two endpoint images,
held fixed. The interior frames are optimised to lower the path energy,
``n_steps * sum_i |f(x_{i+1}) - f(x_i)|^2``, which for a path travelled at constant
speed equals its squared length in representation space. The straight pixel fade
between the endpoints is the natural starting point and the baseline a geodesic
is judged against.

Whether a path is a geodesic, rather than merely shorter than the fade, is judged by
:func:`optimality_residual`: at a stationary path the acceleration of the path in
representation space has no component the model could produce by moving a frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import Checkpoint
from .optimize import (
    OptimizationResult,
    Recorder,
    StopCriterion,
    optimize,
    range_penalty,
)

logger = logging.getLogger(__name__)


@dataclass
class GeodesicResult:
    """An optimised path and the numbers it is judged by."""

    path: Tensor
    initial_path: Tensor
    step_energy: Tensor
    fade_step_energy: Tensor
    deviation: Tensor
    fade_deviation: Tensor
    optimality_residual: Tensor
    fade_optimality_residual: Tensor
    optimization: OptimizationResult

    @property
    def path_energy(self) -> float:
        """Energy of the optimised path."""
        return float(self.step_energy.sum())

    @property
    def fade_energy(self) -> float:
        """Energy of the straight pixel fade between the same endpoints."""
        return float(self.fade_step_energy.sum())

    @property
    def path_length(self) -> float:
        """Length of the optimised path in representation space."""
        return _length(self.step_energy)

    @property
    def fade_length(self) -> float:
        """Length of the straight pixel fade in representation space."""
        return _length(self.fade_step_energy)


def _length(step_energy: Tensor) -> float:
    """Sum of the step lengths, from the step energies ``n_steps * length**2``."""
    n_steps = step_energy.shape[0]
    return float((step_energy / n_steps).sqrt().sum())


def straight_path(start: Tensor, end: Tensor, n_steps: int) -> Tensor:
    """The pixel fade from ``start`` to ``end``: frames (n_steps + 1, channel, y, x)."""
    t = torch.linspace(0, 1, n_steps + 1, dtype=start.dtype, device=start.device)
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * start + t * end


def brownian_bridge(
    start: Tensor, end: Tensor, n_steps: int, seed: int, scale: float
) -> Tensor:
    """The pixel fade plus a Brownian bridge of standard deviation ``scale``.

    The bridge is zero at both ends, so the endpoints are exact.
    """
    generator = torch.Generator().manual_seed(int(seed))
    steps = torch.randn((n_steps, *start.shape[1:]), generator=generator)
    walk = torch.cat([torch.zeros_like(steps[:1]), steps.cumsum(0)])
    t = torch.linspace(0, 1, n_steps + 1).view(-1, 1, 1, 1)
    bridge = (walk - t * walk[-1]) * scale / n_steps**0.5
    return straight_path(start, end, n_steps) + bridge.to(start)


def step_energies(model: torch.nn.Module, path: Tensor) -> Tensor:
    """``n_steps * |f(x_{i+1}) - f(x_i)|^2`` for each of the path's steps."""
    representation = model(path).flatten(1)
    n_steps = path.shape[0] - 1
    return n_steps * (representation[1:] - representation[:-1]).pow(2).sum(1)


def deviation_from_line(model: torch.nn.Module, path: Tensor) -> Tensor:
    """Distance of each frame's representation from the straight line between the
    endpoints' representations, relative to the distance between them."""
    representation = model(path).flatten(1)
    start, end = representation[0], representation[-1]
    direction = end - start
    length = torch.linalg.vector_norm(direction)
    offset = representation - start
    along = (offset @ direction) / length**2
    perpendicular = offset - along[:, None] * direction
    return torch.linalg.vector_norm(perpendicular, dim=1) / length


def optimality_residual(model: torch.nn.Module, path: Tensor) -> Tensor:
    """How far each interior frame is from satisfying the geodesic equation.

    The energy's gradient at interior frame ``x_i`` is ``-2 n J_i^T a_i``, where
    ``a_i = f(x_{i+1}) - 2 f(x_i) + f(x_{i-1})`` is the path's acceleration in
    representation space and ``J_i`` the model's Jacobian at ``x_i``. A path is
    stationary when ``J_i^T a_i = 0``: its acceleration has no component in the
    model's tangent space at ``x_i`` (the range of ``J_i``), only a normal one.

    The residual is the size of that tangential component, as a fraction of the
    path's mean acceleration scale: ``n^2 |p_i| / L``, where ``L`` is the path's
    length and ``p_i`` the projection of ``a_i`` onto the direction ``J_i J_i^T
    a_i``, the direction in which a gradient step on ``x_i`` moves ``f(x_i)``. This
    is the first iterate of a Krylov (LSQR) solve for the projection of ``a_i``
    onto the whole tangent space: it is never larger than that projection, equals
    it where the Jacobian scales every direction alike, and is zero exactly where
    the projection is. The full least-squares solve would need many Jacobian
    products per frame, where this needs one vector-Jacobian and one
    Jacobian-vector product for the whole path.

    The normalisation makes the residual scale-free: it does not change when the
    representation or the pixels are rescaled, and for a smooth path it does not
    depend on the number of steps (``a_i`` shrinks as ``L / n^2``). It is then the
    tangential acceleration of the path traversed in unit time, relative to its
    length: of order 1 for a smooth path whose speed varies by a factor of two
    along it, much larger for a rough one. A path that follows a geodesic's course
    at uneven speed is not stationary, and its residual says so. Dividing by
    ``|a_i|`` instead would give an angle, but one that is meaningless where the
    acceleration is rounding error, as on a straight path at constant speed.

    The range penalty's gradient is not included: where a path leaves the pixel
    range, its optimum balances the penalty against the energy, so its residual
    need not vanish there.

    Parameters
    ----------
    model
        Maps frames (frames, channel, y, x) to representations, each frame on its
        own.
    path
        Frames (n_steps + 1, channel, y, x), endpoints included.

    Returns
    -------
    residual
        Shape (n_steps - 1,), one value per interior frame.
    """
    n_steps = path.shape[0] - 1
    path = path.detach()
    interior = path[1:-1]
    with torch.no_grad():
        representation = model(path)
        steps = representation[1:] - representation[:-1]
        acceleration = steps[1:] - steps[:-1]
        length = torch.linalg.vector_norm(steps.flatten(1), dim=1).sum()
    # torch.autograd.functional rather than torch.func: the latter's transforms
    # break models that cache tensors on themselves during a call, as plenoptic's
    # do with cache_filt.
    with torch.enable_grad():
        _, pulled = torch.autograd.functional.vjp(model, interior, acceleration)
        _, pushed = torch.autograd.functional.jvp(model, interior, pulled)
    # |J^T a|^2 = <a, J J^T a>, so this is the length of a's projection onto J J^T a.
    along = pulled.flatten(1).pow(2).sum(1)
    pushed_norm = torch.linalg.vector_norm(pushed.flatten(1), dim=1)
    # Both vanish together, where a frame's acceleration is wholly normal.
    tangential = torch.where(pushed_norm > 0, along / pushed_norm, 0.0)
    return n_steps**2 * tangential / length


def synthesize_geodesic(
    model: torch.nn.Module,
    start: Tensor,
    end: Tensor,
    seed: int,
    recorder: Recorder,
    *,
    n_steps: int,
    max_iter: int,
    initial: str = "straight",
    bridge_scale: float = 0.05,
    optimizer: dict[str, Any] | None = None,
    penalty_lambda: float = 0.1,
    stop: dict[str, Any] | None = None,
    snapshot_every: int = 0,
    checkpoint: Checkpoint | None = None,
) -> GeodesicResult:
    """Optimise the interior frames of a path from ``start`` to ``end``.

    Parameters
    ----------
    model
        Maps frames (frames, channel, y, x) to representations.
    start, end
        Endpoint images, each (1, channel, y, x), of the same shape.
    seed
        Seed of the Brownian bridge (unused for a straight start).
    recorder
        Receives the trajectory; the whole path is one sample.
    n_steps
        Number of steps, so the path has ``n_steps + 1`` frames.
    max_iter
        Iterations after which the run stops.
    initial
        ``straight`` (the pixel fade) or ``bridge`` (fade plus a Brownian bridge).
    bridge_scale
        Pixel standard deviation of the bridge at its middle, about.
    optimizer, penalty_lambda, stop, snapshot_every, checkpoint
        As in :func:`~stimsynth.synthesis.metamer.synthesize_metamer`.

    Returns
    -------
    result
        The path, its step energies and those of the fade.

    Raises
    ------
    ValueError
        If the endpoints differ in shape or there are fewer than two steps.
    """
    if start.shape != end.shape:
        raise ValueError(
            f"geodesic endpoints must have one shape, got {tuple(start.shape)} "
            f"and {tuple(end.shape)}"
        )
    if n_steps < 2:
        raise ValueError(f"a geodesic needs n_steps >= 2, got {n_steps}")
    start, end = start.detach(), end.detach()
    fade = straight_path(start, end, n_steps)
    if initial == "straight":
        path0 = fade
    elif initial == "bridge":
        path0 = brownian_bridge(start, end, n_steps, seed, bridge_scale)
    else:
        raise ValueError(
            f"initial path {initial!r} is not known; use straight or bridge"
        )

    def assemble(interior: Tensor) -> Tensor:
        return torch.cat([start, interior[0], end])

    def objective(interior: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        energy = step_energies(model, assemble(interior)).sum().view(1)
        penalty = range_penalty(interior)
        return energy + penalty_lambda * penalty, {
            "path_energy": energy,
            "penalty": penalty,
        }

    result = optimize(
        path0[1:-1].unsqueeze(0),
        objective,
        optimizer or {"name": "adam", "lr": 0.001},
        StopCriterion(max_iter=max_iter, **(stop or {})),
        _WholePathRecorder(recorder, start, end),
        snapshot_every=snapshot_every,
        checkpoint=checkpoint,
        description="geodesic",
    )
    path = assemble(result.variable)
    with torch.no_grad():
        return GeodesicResult(
            path=path,
            initial_path=path0,
            step_energy=step_energies(model, path),
            fade_step_energy=step_energies(model, fade),
            deviation=deviation_from_line(model, path),
            fade_deviation=deviation_from_line(model, fade),
            optimality_residual=optimality_residual(model, path),
            fade_optimality_residual=optimality_residual(model, fade),
            optimization=result,
        )


class _WholePathRecorder:
    """Passes a path's snapshots on with their fixed endpoints, as whole paths."""

    def __init__(self, recorder: Recorder, start: Tensor, end: Tensor):
        self._recorder = recorder
        self._start = start.cpu().numpy()
        self._end = end.cpu().numpy()

    def record(self, iteration, scalars):
        self._recorder.record(iteration, scalars)

    def snapshot(self, iteration, image):
        path = np.concatenate([self._start, image[0], self._end])
        self._recorder.snapshot(iteration, path[None])
