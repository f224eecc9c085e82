"""The optimisation loop shared by metamers, MAD competition and geodesics.

Each of these methods changes pixels to lower an objective. They differ in what the
objective is and in what they keep, not in how a step is taken, when a run stops or
what is recorded per iteration; all of that lives here, once.

The variable being optimised has a leading *sample* axis: independent problems
(seeds, MAD directions) synthesised together. The objective returns one value per
sample, and each sample's convergence is judged on its own: a sample that has
converged (or diverged) is frozen and stops changing while the others go on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint

logger = logging.getLogger(__name__)

#: Outcomes a sample (and, by its worst sample, a run) can end with: those whose
#: result may be usable, and those whose result is not.
USABLE_STATUSES = ("converged", "max_iter")
FAILED_STATUSES = ("diverged", "failed")

Objective = Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]


class Schedule(Protocol):
    """Changes what a loop optimises as it goes (coarse-to-fine's stages).

    The loop asks it, after each iteration, what to record with that iteration
    and whether to move on; and, when judging convergence, whether a sample may
    stop yet.
    """

    def start(self, optimizer: torch.optim.Optimizer) -> None:
        """Note the optimiser's starting state, before the first step."""

    def record(self) -> dict[str, np.ndarray]:
        """Scalars describing the iteration just taken (its stage, say)."""

    def update(self, iteration: int, scalars: dict[str, np.ndarray], optimizer) -> None:
        """Decide, from iteration ``iteration``'s scalars, what the next one does."""

    def may_stop(self, iteration: int) -> bool:
        """Whether the run may be judged converged after ``iteration``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on from here after a restart."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to a state from :meth:`state_dict`."""


class Recorder(Protocol):
    """Where a loop sends its trajectory (a run store, or a list in tests)."""

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        """Keep the per-iteration scalars of one iteration."""

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        """Keep a copy of the variable as it was at the start of ``iteration``."""


@dataclass(frozen=True)
class StopCriterion:
    """When a sample counts as converged.

    A sample converges when the mean of its objective over the last ``window``
    iterations differs from the mean over the ``window`` iterations before by less
    than ``max(abs_tol, rel_tol * |last mean|)``. Comparing means rather than two
    single values keeps the brief spikes that Adam makes from passing for a plateau.

    Parameters
    ----------
    max_iter
        Iterations after which a run stops whatever its objective does.
    window
        Number of iterations over which the change of the objective is measured.
    abs_tol
        Absolute change of the objective below which a sample has converged.
    rel_tol
        Change relative to the current objective below which a sample has converged.
    """

    max_iter: int
    window: int = 50
    abs_tol: float = 1e-9
    rel_tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")

    def converged(self, history: np.ndarray) -> np.ndarray:
        """Which samples have converged, given the objective so far.

        Parameters
        ----------
        history
            Objective values, shape (iterations, samples).

        Returns
        -------
        converged
            Boolean per sample.
        """
        if history.shape[0] < 2 * self.window:
            return np.zeros(history.shape[1], dtype=bool)
        change = self.change(history)
        last = history[-self.window :].mean(0)
        return change < np.maximum(self.abs_tol, self.rel_tol * np.abs(last))

    def change(self, history: np.ndarray) -> np.ndarray:
        """Change of the windowed mean objective, per sample."""
        last = history[-self.window :].mean(0)
        before = history[-2 * self.window : -self.window].mean(0)
        return np.abs(before - last)


class Constraint:
    """Holds ``g(x) = target`` for a scalar function ``g`` of each sample.

    Parameters
    ----------
    function
        Maps the variable (samples, ...) to one value per sample.
    target
        The value to hold, per sample.
    """

    def __init__(self, function: Callable[[Tensor], Tensor], target: Tensor):
        self.function = function
        self.target = target.detach()

    def _value_and_gradient(self, variable: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = variable.detach().requires_grad_(True)
            value = self.function(x)
            (gradient,) = torch.autograd.grad(value.sum(), x)
        return value.detach(), gradient

    def project(self, variable: Tensor) -> None:
        """Remove from ``variable.grad`` its component along the constraint's
        gradient, per sample."""
        _, normal = self._value_and_gradient(variable)
        normal = normal.flatten(1)
        grad = variable.grad.flatten(1)
        scale = (grad * normal).sum(1) / normal.pow(2).sum(1).clamp_min(1e-30)
        variable.grad.sub_((scale[:, None] * normal).view_as(variable.grad))

    def correct(
        self, variable: Tensor, rtol: float = 1e-4, max_steps: int = 10
    ) -> None:
        """Newton steps per sample back onto ``g(x) = target``.

        Steps are taken until every sample is within ``rtol`` of its target
        (relative) or ``max_steps`` were taken: where ``g`` curves strongly, one
        step can leave a sample far off the level set.
        """
        for _ in range(max_steps):
            value, normal = self._value_and_gradient(variable)
            error = value - self.target
            if bool((error.abs() <= rtol * self.target.abs()).all()):
                return
            flat = normal.flatten(1)
            step = error / flat.pow(2).sum(1).clamp_min(1e-30)
            with torch.no_grad():
                variable.sub_((step[:, None] * flat).view_as(variable))


@dataclass
class OptimizationResult:
    """What a loop ended with, per sample and as a whole."""

    variable: Tensor
    iterations: int
    status: list[str]
    stop_reason: list[str]
    stop_iteration: list[int]
    objective_history: np.ndarray = field(repr=False)

    @property
    def run_status(self) -> str:
        """The worst status of any sample: one diverged sample marks the run."""
        return max(self.status, key=_STATUS_ORDER.__getitem__)


# Ordered from best to worst outcome.
_STATUS_ORDER = {"converged": 0, "max_iter": 1, "diverged": 2, "failed": 3}


def make_optimizer(params: list[Tensor], spec: dict[str, Any]) -> torch.optim.Optimizer:
    """Build a torch optimiser from a spec such as ``{"name": "adam", "lr": 0.01}``.

    Adam defaults to ``amsgrad=True`` and a learning rate of 0.01, as plenoptic does.
    L-BFGS takes one quasi-Newton step per iteration of the loop, with a strong
    Wolfe line search unless ``line_search: none`` is given, and keeps
    ``history_size`` past steps (default 100).

    Parameters
    ----------
    params
        Tensors to optimise.
    spec
        ``name`` (``adam``, ``sgd`` or ``lbfgs``) and keyword arguments for the
        optimiser; a
        ``scheduler`` entry is read by :func:`make_scheduler`, not here.

    Returns
    -------
    optimizer
        The optimiser, ready to step.

    Raises
    ------
    ValueError
        If the optimiser name is unknown.
    """
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "scheduler")}
    name = spec.get("name", "adam").lower()
    if name == "adam":
        kwargs.setdefault("lr", 0.01)
        kwargs.setdefault("amsgrad", True)
        return torch.optim.Adam(params, **kwargs)
    if name == "sgd":
        kwargs.setdefault("lr", 0.01)
        return torch.optim.SGD(params, **kwargs)
    if name == "lbfgs":
        line_search = kwargs.pop("line_search", "strong_wolfe")
        kwargs.setdefault("lr", 1.0)
        kwargs.setdefault("history_size", 100)
        # One quasi-Newton step per iteration of the loop, so that each recorded
        # iteration is one step, as with the other optimisers.
        return torch.optim.LBFGS(
            params,
            max_iter=1,
            line_search_fn=None if line_search == "none" else line_search,
            **kwargs,
        )
    raise ValueError(
        f"optimizer name {name!r} is not known; use 'adam', 'sgd' or 'lbfgs'"
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, spec: dict[str, Any] | None
) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """A learning-rate scheduler from the optimiser spec's ``scheduler`` entry.

    ``{"name": "plateau", "factor": 0.5, "patience": 50}`` lowers the learning
    rate by ``factor`` when the objective, summed over samples, has not improved for
    ``patience`` iterations (torch's ``ReduceLROnPlateau``).

    Raises
    ------
    ValueError
        If the scheduler name is unknown.
    """
    if not spec:
        return None
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if spec.get("name") == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
    raise ValueError(f"scheduler name {spec.get('name')!r} is not known; use 'plateau'")


def optimize(
    initial: Tensor,
    objective: Objective,
    optimizer: dict[str, Any],
    stop: StopCriterion,
    recorder: Recorder,
    snapshot_every: int = 0,
    description: str = "synthesis",
    constraint: Constraint | None = None,
    schedule: Schedule | None = None,
    checkpoint: Checkpoint | None = None,
) -> OptimizationResult:
    """Lower ``objective`` by changing ``initial``, one sample at a time in parallel.

    At every iteration the objective is evaluated on the current variable, its
    gradient is taken and the optimiser steps. What is recorded for iteration ``i``
    describes the variable as it was *before* step ``i`` (objective and its parts,
    gradient norm), and the norm of the change that step ``i`` made, so iteration 0
    holds the objective of the initial image.

    Parameters
    ----------
    initial
        Starting variable, shape (samples, ...). It is not modified.
    objective
        Maps the variable to the value to lower per sample (shape (samples,)) and a
        dict of named parts, each of shape (samples,), recorded alongside. A part
        named ``objective`` is what is recorded and judged as the objective in
        place of the value lowered: coarse-to-fine steps along one scale's loss
        while its convergence is judged on the loss over all scales.
    optimizer
        Spec for :func:`make_optimizer`. L-BFGS treats the whole variable as one
        vector, so it takes one sample only.
    stop
        When a sample has converged and when the run gives up.
    recorder
        Receives every iteration's scalars and the snapshots.
    snapshot_every
        Keep the variable every this many iterations (0: never).
    description
        Label of the progress bar.
    constraint
        Keeps each sample on a level set: its gradient is projected onto the level
        set's tangent space before each step, and each step is followed by a
        correction back onto it.
    schedule
        Changes what is optimised as the run goes, adds to what is recorded, and
        says when the run may stop (see :class:`Schedule`).
    checkpoint
        Where the loop's whole state is saved every ``checkpoint.every``
        iterations, and from where a restarted run goes on: the variable, the
        optimiser's, scheduler's and schedule's state, the objective history and
        each sample's outcome so far. A resumed run takes the same steps as one
        that was never stopped.

    Returns
    -------
    result
        The final variable and each sample's outcome.

    Raises
    ------
    ValueError
        For L-BFGS with more than one sample, or an unknown optimiser.
    """
    variable = initial.detach().clone().requires_grad_(True)
    opt = make_optimizer([variable], optimizer)
    n_samples = variable.shape[0]
    if isinstance(opt, torch.optim.LBFGS) and n_samples > 1:
        raise ValueError(
            f"L-BFGS couples the samples of a batch, got {n_samples}; synthesise "
            "one sample at a time with it, or use adam or sgd"
        )
    scheduler = make_scheduler(opt, optimizer.get("scheduler"))
    if schedule is not None:
        schedule.start(opt)
    active = np.ones(n_samples, dtype=bool)
    running = _mask(active, variable)
    status = ["max_iter"] * n_samples
    reason = [f"reached max_iter={stop.max_iter}"] * n_samples
    stop_iteration = [stop.max_iter] * n_samples
    history = np.full((stop.max_iter, n_samples), np.nan)
    start = 0
    judged_from = 0
    state = checkpoint.load(variable.device) if checkpoint is not None else None
    if state is not None:
        with torch.no_grad():
            variable.copy_(state["variable"])
        opt.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        start = state["iteration"]
        judged_from = state.get("judged_from", 0)
        history[:start] = state["history"]
        active = state["active"].copy()
        running = _mask(active, variable)
        status, reason = list(state["status"]), list(state["reason"])
        stop_iteration = list(state["stop_iteration"])
        torch.set_rng_state(state["rng"])
        logger.info("%s resumes at iteration %d", description, start)
        if checkpoint.continuing:
            # A finished run sent back for more iterations: every sample goes on,
            # and convergence is judged on the iterations from here only.
            active[:] = True
            running = _mask(active, variable)
            status = ["max_iter"] * n_samples
            reason = [f"reached max_iter={stop.max_iter}"] * n_samples
            stop_iteration = [stop.max_iter] * n_samples
            judged_from = start

    def save(next_iteration: int, final: bool = False) -> None:
        checkpoint.save(
            {
                "iteration": next_iteration,
                "variable": variable.detach(),
                "optimizer": opt.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "schedule": schedule.state_dict() if schedule else None,
                "history": history[:next_iteration].copy(),
                "active": active.copy(),
                "status": list(status),
                "reason": list(reason),
                "stop_iteration": list(stop_iteration),
                "rng": torch.get_rng_state(),
                "judged_from": judged_from,
            },
            final=final,
        )

    # What the first evaluation of an iteration saw: L-BFGS evaluates the
    # objective again during its line search, and the record describes the
    # variable before the step.
    first: list[tuple[Tensor, dict[str, Tensor], Tensor]] = []

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=False)
        values, parts = objective(variable)
        values.sum().backward()
        if constraint is not None:
            constraint.project(variable)
        if not first:
            first.append(
                (values.detach(), _detached(parts), _per_sample_norm(variable.grad))
            )
        return values.sum().detach()

    # The bar shows on a terminal only; a job's log gets a line every tenth of the run.
    progress = tqdm(
        range(start, stop.max_iter),
        desc=description,
        mininterval=2.0,
        disable=None,
        initial=start,
        total=stop.max_iter,
    )
    report_every = max(1, stop.max_iter // 10)
    iteration = start - 1
    for iteration in progress:
        if snapshot_every and iteration % snapshot_every == 0:
            # A copy: on the CPU, .numpy() shares memory with the variable that the
            # optimiser is about to change in place.
            recorder.snapshot(iteration, variable.detach().cpu().numpy().copy())

        before = variable.detach().clone()
        first.clear()
        opt.step(closure)
        values, parts, gradient_norm = first[0]
        if constraint is not None:
            constraint.correct(variable)
        if not active.all():
            with torch.no_grad():
                # A finished sample keeps the image it finished with.
                variable.copy_(torch.where(running, variable, before))

        # One transfer from the device per iteration rather than one per number.
        recorded = parts.pop("objective", values)
        names = ["objective", *parts, "gradient_norm", "pixel_change_norm"]
        with torch.no_grad():
            rows = [
                recorded,
                *parts.values(),
                gradient_norm,
                _per_sample_norm(variable - before),
            ]
            table = torch.stack([r.to(torch.float64) for r in rows])
        scalars = dict(zip(names, table.cpu().numpy(), strict=True))
        scalars["learning_rate"] = np.float64(opt.param_groups[0]["lr"])
        if schedule is not None:
            scalars.update(schedule.record())
        history[iteration] = scalars["objective"]
        recorder.record(iteration, scalars)
        if scheduler is not None:
            scheduler.step(float(np.nansum(scalars["objective"][active])))

        may_stop = schedule is None or schedule.may_stop(iteration)
        finished = _judge(
            history[judged_from : iteration + 1],
            stop,
            active,
            status,
            reason,
            may_stop,
            offset=judged_from,
        )
        for s in finished:
            stop_iteration[s] = iteration + 1
            active[s] = False
            if status[s] == "diverged":
                with torch.no_grad():
                    # Keep the last image the objective was computed on, not the
                    # step taken along a non-finite gradient.
                    variable[s] = before[s]
        if finished:
            running = _mask(active, variable)
        if schedule is not None:
            schedule.update(iteration, scalars, opt)
        if iteration % 50 == 0:
            progress.set_postfix(objective=f"{np.nanmean(history[iteration]):.4g}")
        if iteration % report_every == 0 and logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s iteration %d/%d: objective %s, %d of %d samples still running",
                description,
                iteration,
                stop.max_iter,
                np.array2string(history[iteration], precision=4),
                int(active.sum()),
                n_samples,
            )
        if not active.any():
            break
        if checkpoint is not None and checkpoint.due(iteration):
            save(iteration + 1)
    progress.close()
    if checkpoint is not None and checkpoint.final_path is not None:
        # Kept so that the audit can send the run back for more iterations.
        save(iteration + 1, final=True)

    return OptimizationResult(
        variable=variable.detach(),
        iterations=iteration + 1,
        status=status,
        stop_reason=reason,
        stop_iteration=stop_iteration,
        objective_history=history[: iteration + 1],
    )


def _detached(parts: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach() for name, value in parts.items()}


def _mask(active: np.ndarray, variable: Tensor) -> Tensor:
    """The running samples as a mask that broadcasts against the variable."""
    shape = (len(active),) + (1,) * (variable.dim() - 1)
    return torch.from_numpy(active.copy()).to(variable.device).view(shape)


def _judge(
    history: np.ndarray,
    stop: StopCriterion,
    active: np.ndarray,
    status: list[str],
    reason: list[str],
    may_stop: bool = True,
    offset: int = 0,
) -> list[int]:
    """Mark samples that diverged or converged this iteration; return their indices.

    A sample diverges whenever its objective is not finite; it converges only when
    ``may_stop`` allows.
    """
    finished = []
    converged = stop.converged(history) & may_stop
    last = history[-1]
    for s in range(history.shape[1]):
        if not active[s]:
            continue
        if not math.isfinite(last[s]):
            status[s] = "diverged"
            reason[s] = (
                f"objective became {last[s]} at iteration {offset + len(history) - 1}"
            )
            finished.append(s)
        elif converged[s]:
            change = stop.change(history)[s]
            status[s] = "converged"
            reason[s] = (
                f"mean objective changed by {change:.3g} between the last two "
                f"windows of {stop.window} iterations (tolerance "
                f"max({stop.abs_tol:g}, {stop.rel_tol:g} x |objective|))"
            )
            finished.append(s)
    return finished


def _per_sample_norm(tensor: Tensor) -> Tensor:
    """L2 norm of each sample of a (samples, ...) tensor."""
    return torch.linalg.vector_norm(tensor.detach().flatten(1), dim=1)


def range_penalty(image: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Sum of squared excursions outside ``[low, high]``, per sample.

    Parameters
    ----------
    image
        Images, shape (samples, ...).
    low, high
        The allowed pixel range.

    Returns
    -------
    penalty
        Shape (samples,).
    """
    below = torch.clamp(image - low, max=0).pow(2)
    above = torch.clamp(image - high, min=0).pow(2)
    return (below + above).flatten(1).sum(1)
