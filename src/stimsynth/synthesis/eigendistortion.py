"""Eigendistortions: the image changes a model is most and least sensitive to.

For a model ``f`` and an image ``x`` with Jacobian ``J = df/dx``, the Fisher
information matrix (for additive Gaussian noise on the representation) is
``F = J^T J``. Its top eigenvectors are the distortions that change the
representation most per unit of pixel change; its bottom ones, those that change it
least. Eigendistortions have unit norm, and their eigenvalues are the squared
representation change per unit of distortion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .optimize import Recorder

logger = logging.getLogger(__name__)

METHODS = ("power", "exact")


@dataclass
class EigendistortionResult:
    """Eigenpairs of the Fisher information matrix at one image."""

    eigenindex: list[int]
    eigenvalues: Tensor
    eigendistortions: Tensor
    residuals: Tensor
    iterations: int
    status: str
    stop_reason: str
    n_pixels: int


class FisherOperator:
    """Products with ``F = J^T J`` at one image, without forming ``J``.

    The forward pass is done once; each product reuses its graph: ``J v`` comes
    from differentiating ``J^T u`` with respect to a dummy ``u`` (the
    double-backward trick, which needs no forward-mode support from the model),
    and ``J^T (J v)`` from one more backward pass.
    """

    def __init__(self, model: torch.nn.Module, image: Tensor):
        self.image = image.detach().clone().requires_grad_(True)
        self.representation = model(self.image)
        self._dummy = torch.zeros_like(self.representation, requires_grad=True)
        (self._vjp_of_dummy,) = torch.autograd.grad(
            self.representation, self.image, self._dummy, create_graph=True
        )
        self.n_pixels = self.image.numel()
        self.n_outputs = self.representation.numel()

    def matvec(self, vectors: Tensor) -> Tensor:
        """``F v`` for each row of ``vectors`` (k, n_pixels)."""
        products = []
        for v in vectors:
            (jv,) = torch.autograd.grad(
                self._vjp_of_dummy,
                self._dummy,
                v.view_as(self.image),
                retain_graph=True,
            )
            (fv,) = torch.autograd.grad(
                self.representation, self.image, jv, retain_graph=True
            )
            products.append(fv.flatten())
        return torch.stack(products).detach()


def exact_memory_mb(n_pixels: int, n_outputs: int, itemsize: int) -> float:
    """Memory the exact method needs: the Jacobian and the Fisher matrix."""
    return (n_outputs * n_pixels + 2 * n_pixels * n_pixels) * itemsize / 2**20


def synthesize_eigendistortion(
    model: torch.nn.Module,
    image: Tensor,
    seed: int,
    recorder: Recorder,
    *,
    method: str = "power",
    k: int = 1,
    max_iter: int = 1000,
    tol: float = 1e-5,
    memory_budget_mb: float = 2048,
) -> EigendistortionResult:
    """Find the top ``k`` and bottom ``k`` eigendistortions of ``model`` at ``image``.

    Parameters
    ----------
    model
        Maps images to representations.
    image
        Shape (1, channel, y, x).
    seed
        Seed of the starting vectors of the power method.
    recorder
        Receives, per iteration, each eigenpair's eigenvalue estimate and residual
        ``|F v - lambda v|`` (NaN for an eigenpair not being iterated then).
    method
        ``power`` (block power iteration, then power iteration on ``lambda_max I -
        F`` for the bottom) or ``exact`` (forms ``F``; refused above the budget).
    k
        Number of eigendistortions at each end of the spectrum.
    max_iter
        Most power iterations for each end.
    tol
        Power iteration stops when every residual is below ``tol * lambda_max``.
    memory_budget_mb
        Memory the exact method may use.

    Returns
    -------
    result
        Eigenvalues (descending), unit-norm eigendistortions and residuals.

    Raises
    ------
    ValueError
        For an unknown method, a ``k`` too large for the image, or an exact solve
        beyond the memory budget.
    """
    image = image.detach()
    operator = FisherOperator(model, image)
    n = operator.n_pixels
    if not 1 <= k <= n // 2:
        raise ValueError(f"k must be between 1 and {n // 2} for this image, got {k}")
    if method == "exact":
        need = exact_memory_mb(n, operator.n_outputs, image.element_size())
        if need > memory_budget_mb:
            raise ValueError(
                f"the exact eigendistortion of a {tuple(image.shape)} image needs "
                f"about {need:.0f} MB, over the budget of {memory_budget_mb:.0f} MB; "
                "use method: power, or raise memory_budget_mb"
            )
        return _exact(operator, k, recorder)
    if method != "power":
        raise ValueError(f"method {method!r} is not known; use one of {METHODS}")
    return _power(operator, image, seed, k, max_iter, tol, recorder)


def _exact(
    operator: FisherOperator, k: int, recorder: Recorder
) -> EigendistortionResult:
    """Form ``F`` column block by column block and take its full eigendecomposition."""
    n = operator.n_pixels
    identity = torch.eye(n, dtype=operator.image.dtype, device=operator.image.device)
    fisher = torch.cat([operator.matvec(block) for block in identity.split(256)])
    fisher = (fisher + fisher.T) / 2
    values, vectors = torch.linalg.eigh(fisher)
    order = list(range(n - 1, n - 1 - k, -1)) + list(range(k - 1, -1, -1))
    eigenvalues = values[order]
    eigenvectors = vectors[:, order].T
    residuals = _rayleigh(eigenvectors, operator.matvec(eigenvectors))[1]
    recorder.record(
        0, {"eigenvalue_trace": _np(eigenvalues), "residual_trace": _np(residuals)}
    )
    return EigendistortionResult(
        eigenindex=list(range(k)) + list(range(n - k, n)),
        eigenvalues=eigenvalues,
        eigendistortions=eigenvectors.view(2 * k, *operator.image.shape[1:]),
        residuals=residuals,
        iterations=1,
        status="converged",
        stop_reason="exact eigendecomposition of the Fisher matrix",
        n_pixels=n,
    )


def _power(
    operator: FisherOperator,
    image: Tensor,
    seed: int,
    k: int,
    max_iter: int,
    tol: float,
    recorder: Recorder,
) -> EigendistortionResult:
    """Block power iteration for the top ``k``, then on the shifted matrix for the
    bottom ``k``."""
    n = operator.n_pixels
    generator = torch.Generator().manual_seed(int(seed))
    start = torch.randn((2 * k, n), generator=generator).to(image)
    trace = _Trace(recorder, k)

    top, top_values, top_iters, top_ok = _power_block(
        operator.matvec, start[:k], max_iter, tol, None, trace, 0
    )
    lambda_max = float(top_values[0])
    bottom, _, bottom_iters, bottom_ok = _power_block(
        operator.matvec, start[k:], max_iter, tol, lambda_max, trace, k
    )
    vectors = torch.cat([top, bottom.flip(0)])
    values, residuals = _rayleigh(vectors, operator.matvec(vectors))
    ok = top_ok and bottom_ok
    worst = float(residuals.max()) / lambda_max
    counts = f"{top_iters} top and {bottom_iters} bottom power iterations"
    reason = (
        f"every residual below tol x lambda_max ({worst:.2e} < {tol:g}) and every "
        f"eigenvalue steady over {STEADY_WINDOW} iterations, after {counts}"
        if ok
        else f"reached max_iter={max_iter} for "
        + " and ".join(
            end for end, done in (("top", top_ok), ("bottom", bottom_ok)) if not done
        )
        + f" ({counts}), residual / lambda_max = {worst:.2e}"
    )
    return EigendistortionResult(
        eigenindex=list(range(k)) + list(range(n - k, n)),
        eigenvalues=values,
        eigendistortions=vectors.view(2 * k, *image.shape[1:]),
        residuals=residuals,
        iterations=top_iters + bottom_iters,
        status="converged" if ok else "max_iter",
        stop_reason=reason,
        n_pixels=n,
    )


#: Iterations over which an eigenvalue estimate must be steady to count as found.
STEADY_WINDOW = 50
#: Largest relative change of an eigenvalue estimate over that window.
STEADY_TOL = 1e-3


def _power_block(matvec, start, max_iter, tol, shift, trace, offset):
    """Orthogonal (block power) iteration from ``start`` (k, n).

    Without ``shift`` it iterates ``F`` and finds the top eigenpairs; with a shift
    (the largest eigenvalue) it iterates ``shift I - F``, whose top eigenpairs are
    the bottom ones of ``F``.

    An end of the spectrum is found when every residual ``|Fv - lambda v|`` is below
    ``tol * lambda_max`` and every eigenvalue estimate changed by less than
    ``STEADY_TOL`` of itself over the last ``STEADY_WINDOW`` iterations. The second
    test matters at the bottom, where eigenvalues can be many orders of magnitude
    below ``lambda_max``: a small residual alone says little about them there.

    Returns the vectors, their eigenvalue estimates of ``F``, the iterations taken
    and whether they were found.
    """
    vectors = torch.linalg.qr(start.T).Q.T
    converged = False
    iteration = 0
    history = []
    steps = tqdm(
        range(1, max_iter + 1), desc="eigendistortion", mininterval=2, disable=None
    )
    for iteration in steps:
        fv = matvec(vectors)
        values, residuals = _rayleigh(vectors, fv)
        trace.record(offset, values, residuals)
        history.append(values)
        if iteration % max(1, max_iter // 10) == 0:
            logger.info(
                "power iteration %d/%d: eigenvalues %s, residuals %s",
                iteration,
                max_iter,
                np.array2string(_np(values), precision=4),
                np.array2string(_np(residuals), precision=2),
            )
        scale = shift if shift is not None else float(values.abs().max())
        if bool((residuals < tol * scale).all()) and _steady(history):
            converged = True
            break
        product = fv if shift is None else shift * vectors - fv
        vectors = torch.linalg.qr(product.T).Q.T
    return vectors, values, iteration, converged


def _steady(history: list[Tensor]) -> bool:
    """Whether every eigenvalue estimate held still over the last window."""
    if len(history) <= STEADY_WINDOW:
        return False
    now, then = history[-1], history[-1 - STEADY_WINDOW]
    return bool(((now - then).abs() <= STEADY_TOL * now.abs()).all())


class _Trace:
    """Records eigenvalue estimates and residuals with one row per iteration."""

    def __init__(self, recorder: Recorder, k: int):
        self._recorder = recorder
        self._k = k
        self._iteration = 0

    def record(self, offset: int, values: Tensor, residuals: Tensor) -> None:
        eigenvalue = np.full(2 * self._k, np.nan)
        residual = np.full(2 * self._k, np.nan)
        # Bottom eigenpairs are found smallest last: store them in eigenindex order.
        index = slice(offset, offset + self._k)
        ordered = (lambda a: a) if offset == 0 else (lambda a: a[::-1])
        eigenvalue[index] = ordered(_np(values))
        residual[index] = ordered(_np(residuals))
        self._recorder.record(
            self._iteration,
            {"eigenvalue_trace": eigenvalue, "residual_trace": residual},
        )
        self._iteration += 1


def _rayleigh(vectors: Tensor, fv: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalue estimates ``v . Fv`` and residuals ``|Fv - lambda v|``."""
    values = torch.einsum("kn,kn->k", vectors, fv)
    return values, torch.linalg.vector_norm(fv - values[:, None] * vectors, dim=1)


def _np(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float64)
