"""Eigendistortions: the image changes a model is most and least sensitive to.

For a model ``f`` and an image ``x`` with Jacobian ``J = df/dx``, the Fisher
information matrix (for additive Gaussian noise on the representation) is
``F = J^T J``. Its top eigenvectors are the distortions that change the
representation most per unit of pixel change; its bottom ones, those that change it
least. Eigendistortions have unit norm, and their eigenvalues are the squared
representation change per unit of distortion.

Four methods find them; all but ``exact`` need only products ``F v``:

- ``exact`` forms ``F`` and takes its full eigendecomposition (small images only);
- ``lanczos``, a thick-restart block Lanczos method, finds both ends of the spectrum
  from one Krylov space. It is the method of choice for the bottom eigenpairs, whose
  eigenvalues for a front-end model are around ``1e-5`` of the top one;
- ``power``, block power iteration for the top and power iteration on
  ``lambda_max I - F`` for the bottom, simple but slow at the bottom;
- ``randomized``, randomized subspace iteration (a randomized SVD) for the top; its
  bottom eigenpairs come from ``lanczos``, because a randomized range finder
  captures the large eigenvalues of a matrix and not its small ones.
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

METHODS = ("power", "exact", "lanczos", "randomized")


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
        #: Products ``F v`` taken so far, the cost measure of every method.
        self.n_products = 0

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
        self.n_products += len(vectors)
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
    oversampling: int = 10,
    krylov_size: int = 64,
) -> EigendistortionResult:
    """Find the top ``k`` and bottom ``k`` eigendistortions of ``model`` at ``image``.

    Parameters
    ----------
    model
        Maps images to representations.
    image
        Shape (1, channel, y, x).
    seed
        Seed of the random starting vectors of the iterative methods.
    recorder
        Receives, per iteration, each eigenpair's eigenvalue estimate and residual
        ``|F v - lambda v|`` (NaN for an eigenpair not being iterated then).
    method
        One of ``METHODS``: ``power`` (block power iteration, then power iteration
        on ``lambda_max I - F`` for the bottom), ``exact`` (forms ``F``; refused
        above the budget), ``lanczos`` (thick-restart block Lanczos for both ends at
        once) or ``randomized`` (randomized subspace iteration for the top, then
        ``lanczos`` for the bottom).
    k
        Number of eigendistortions at each end of the spectrum.
    max_iter
        Most iterations: for ``power`` and ``randomized``, for each end; for
        ``lanczos``, Krylov steps (each ``k`` products with ``F``) for both ends
        together.
    tol
        Power iteration stops when every residual is below ``tol * lambda_max`` and
        every eigenvalue is steady; ``lanczos`` and ``randomized`` stop when every
        residual is below ``tol * lambda_max`` and every eigenvalue's error bound
        (see ``_error_bounds``) is below ``tol`` times the eigenvalue.
    memory_budget_mb
        Memory the exact method may use.
    oversampling
        Extra vectors in the randomized block (``k + oversampling`` in all).
    krylov_size
        Largest Krylov basis of ``lanczos`` before it restarts, keeping the Ritz
        vectors nearest each end; at least ``3 k + 4`` (or the number of pixels).

    Returns
    -------
    result
        Eigenvalues (descending), unit-norm eigendistortions and residuals.

    Raises
    ------
    ValueError
        For an unknown method, a ``k`` too large for the image, an exact solve
        beyond the memory budget, or an oversampling or Krylov size out of range.
    """
    if method not in METHODS:
        raise ValueError(
            f"method {method!r} is not known; use one of {', '.join(METHODS)}"
        )
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
                "use method: lanczos, or raise memory_budget_mb"
            )
        return _exact(operator, k, recorder)
    if method == "power":
        return _power(operator, image, seed, k, max_iter, tol, recorder)
    if oversampling < 0:
        raise ValueError(f"oversampling must be 0 or more, got {oversampling}")
    if min(krylov_size, n) < min(3 * k + 4, n):
        raise ValueError(
            f"krylov_size must be at least 3 k + 4 = {3 * k + 4} for k={k}, "
            f"got {krylov_size}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    trace = _Trace(recorder, k)
    if method == "lanczos":
        krylov = _lanczos(operator, generator, k, max_iter, tol, krylov_size, trace)
        return _result(operator, krylov.vectors, krylov.status, krylov.reason, krylov)
    top = _randomized_top(operator, generator, k, oversampling, max_iter, tol, trace)
    bottom = _lanczos(
        operator, generator, k, max_iter, tol, krylov_size, trace, ends=("bottom",)
    )
    vectors = torch.cat([top.vectors[:k], bottom.vectors[k:]])
    ok = top.status == bottom.status == "converged"
    reason = (
        f"top by randomized subspace iteration: {top.reason}; bottom by lanczos, "
        "since a randomized range finder does not resolve small eigenvalues: "
        f"{bottom.reason}"
    )
    return _result(
        operator, vectors, "converged" if ok else "max_iter", reason, top, bottom
    )


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


@dataclass
class _Run:
    """What one iterative solver found: ``vectors`` holds the top eigenpairs
    (descending), then the bottom ones (descending), as far as it looked for them."""

    vectors: Tensor
    status: str
    reason: str
    iterations: int


def _result(
    operator: FisherOperator, vectors: Tensor, status: str, reason: str, *runs: _Run
) -> EigendistortionResult:
    """Final eigenpairs from one fresh product with each vector, so that the stored
    eigenvalues and residuals do not depend on how a solver kept its products."""
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    values, residuals = _rayleigh(vectors, operator.matvec(vectors))
    n, k = operator.n_pixels, len(vectors) // 2
    return EigendistortionResult(
        eigenindex=list(range(k)) + list(range(n - k, n)),
        eigenvalues=values,
        eigendistortions=vectors.view(2 * k, *operator.image.shape[1:]),
        residuals=residuals,
        iterations=sum(run.iterations for run in runs),
        status=status,
        stop_reason=f"{reason}; {operator.n_products} Fisher products in all",
        n_pixels=n,
    )


def _error_bounds(
    values: Tensor, residuals: Tensor, gaps: Tensor, lambda_max: float, n_pixels: int
) -> tuple[Tensor, Tensor]:
    """Bounds on the eigenvalue errors of Ritz pairs, and the sizes they are to be
    small next to.

    A Ritz value ``theta`` with residual ``r`` is within ``r`` of an eigenvalue of
    ``F``, and within ``r**2 / gap`` when the rest of the spectrum is ``gap`` away
    (the quadratic residual bound, after Kato and Temple), with ``gap`` estimated by
    the nearest Ritz value outside the wanted ones. The quadratic bound is what makes
    a bottom eigenvalue ``1e-5`` of ``lambda_max`` trustworthy once ``r`` is small
    next to ``lambda_max``.

    The sizes are ``max(|theta|, floor)``, where ``floor`` is the rounding error of a
    product with ``F`` (machine precision times ``sqrt(n_pixels) * lambda_max``):
    below it no method can tell an eigenvalue from zero.
    """
    quadratic = residuals**2 / gaps.clamp_min(0)
    bounds = torch.minimum(residuals, torch.nan_to_num(quadratic, nan=torch.inf))
    floor = torch.finfo(values.dtype).eps * n_pixels**0.5 * lambda_max
    return bounds, values.abs().clamp_min(floor)


def _positive(value: Tensor) -> float:
    """A largest eigenvalue as a scale, kept above zero for a model that ignores its
    input."""
    return max(float(value), torch.finfo(value.dtype).tiny)


def _found(
    residuals: Tensor, bounds: Tensor, sizes: Tensor, tol: float, lambda_max: float
) -> tuple[bool, float, float]:
    """Whether Ritz pairs count as eigenpairs: every residual below
    ``tol * lambda_max`` and every eigenvalue error bound below ``tol`` of its size.
    Returns that, the worst residual over ``lambda_max`` and the worst relative
    bound."""
    worst_residual = float(residuals.max()) / lambda_max
    worst_bound = float((bounds / sizes).max())
    return worst_residual < tol and worst_bound < tol, worst_residual, worst_bound


def _orthonormalize(block: Tensor, basis: Tensor, generator: torch.Generator) -> Tensor:
    """Rows of ``block`` made orthonormal to the rows of ``basis`` and to each other.

    Classical Gram-Schmidt twice over ("twice is enough") keeps the basis orthogonal
    to machine precision. A row that lies in the span already, numerically, is
    replaced by a random one: the Krylov space has found an invariant subspace and
    the search goes on in a fresh direction.
    """
    n = block.shape[1]
    threshold = 1e3 * torch.finfo(block.dtype).eps
    rows: list[Tensor] = []
    for row in block:
        for _ in range(3):
            done = torch.cat([basis, *[r[None] for r in rows]])
            before = torch.linalg.vector_norm(row)
            for _ in range(2):
                row = row - (done @ row) @ done
            after = torch.linalg.vector_norm(row)
            if after > threshold * before:
                break
            row = torch.randn(n, generator=generator, dtype=torch.float64).to(row)
        rows.append(row / after)
    return torch.stack(rows)


def _ritz(basis: Tensor, products: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh-Ritz on a basis (orthonormal rows) and its products with ``F``:
    Ritz values ascending and their coordinates (columns) in the basis."""
    projected = (basis @ products.T).double()
    values, coordinates = torch.linalg.eigh((projected + projected.T) / 2)
    return values.to(basis.dtype), coordinates.to(basis.dtype)


def _lanczos(
    operator: FisherOperator,
    generator: torch.Generator,
    k: int,
    max_iter: int,
    tol: float,
    krylov_size: int,
    trace: _Trace,
    ends: tuple[str, ...] = ("top", "bottom"),
) -> _Run:
    """Thick-restart block Lanczos for the top and bottom ``k`` eigenpairs.

    The Krylov space grows by one block of ``k`` vectors per iteration, the
    products with ``F`` of the newest block made orthogonal to the whole basis (full
    reorthogonalisation). Rayleigh-Ritz on the basis and the products kept with it
    gives Ritz pairs at both ends each iteration. When the basis would outgrow
    ``krylov_size``, it restarts from the Ritz vectors nearest each end (thick
    restart, which keeps the Krylov structure). Lanczos converges at the ends of the
    spectrum at a rate set by the square root of the relative gap, where power
    iteration has the gap itself: this is what finds bottom eigenvalues that are
    clustered and ``1e-5`` of the top one.

    ``ends`` names the ends that must converge and are recorded; both are always
    returned, top first.
    """
    n = operator.n_pixels
    size = min(krylov_size, n)
    # Ritz vectors kept at each end at a restart, leaving room for a few blocks.
    keep = k + max(1, (size - 3 * k) // 4)
    dtype, device = operator.image.dtype, operator.image.device
    basis = torch.empty((0, n), dtype=dtype, device=device)
    products = torch.empty((0, n), dtype=dtype, device=device)
    start = torch.randn((k, n), generator=generator, dtype=torch.float64)
    block = _orthonormalize(start.to(basis), basis, generator)
    restarts = 0
    found = whole = False
    iteration = 0
    steps = tqdm(range(1, max_iter + 1), desc="lanczos", mininterval=2, disable=None)
    for iteration in steps:
        fv = operator.matvec(block)
        basis = torch.cat([basis, block])
        products = torch.cat([products, fv])
        values, coordinates = _ritz(basis, products)
        m = len(values)
        # Top then bottom, descending; with a basis of only k vectors, the same
        # Ritz values estimate either end.
        wanted = [m - 1 - i for i in range(k)] + [k - 1 - i for i in range(k)]
        pairs = coordinates[:, wanted].T
        ritz_vectors = pairs @ basis
        ritz_values = values[wanted]
        residuals = torch.linalg.vector_norm(
            pairs @ products - ritz_values[:, None] * ritz_vectors, dim=1
        )
        lambda_max = _positive(values[-1])
        # Distance to the nearest Ritz value outside the wanted ones at each end.
        gaps = torch.full_like(ritz_values, torch.nan)
        if m > 2 * k:
            gaps[:k] = ritz_values[:k] - values[m - 1 - k]
            gaps[k:] = values[k] - ritz_values[k:]
        bounds, sizes = _error_bounds(ritz_values, residuals, gaps, lambda_max, n)
        check = _end_positions(ends, k)
        found, worst_residual, worst_bound = _found(
            residuals[check], bounds[check], sizes[check], tol, lambda_max
        )
        whole = m == n
        trace.record_all(ritz_values, residuals, ends)
        if iteration % max(1, max_iter // 10) == 0:
            logger.info(
                "lanczos iteration %d/%d: eigenvalues %s, residuals %s",
                iteration,
                max_iter,
                np.array2string(_np(ritz_values), precision=4),
                np.array2string(_np(residuals), precision=2),
            )
        if found or whole:
            break
        # The products of the newest block, orthogonal to the whole basis, continue
        # the Krylov space; made orthogonal before a restart, they keep the
        # residuals of the kept Ritz vectors in the space.
        block = _orthonormalize(fv, basis, generator)[: n - m]
        if m + k > size and size < n:
            kept = list(range(keep)) + list(range(m - keep, m))
            basis = coordinates[:, kept].T @ basis
            products = coordinates[:, kept].T @ products
            restarts += 1
    vectors = ritz_vectors
    counts = (
        f"{iteration} Krylov steps of {k} vector(s), basis of at most {size}, "
        f"{restarts} restart(s)"
    )
    which = " and ".join(ends)
    if whole and not found:
        reason = (
            "the Krylov space is the whole space, so the Ritz pairs are "
            f"exact, after {counts}"
        )
        found = True
    elif found:
        reason = (
            f"every {which} residual below tol x lambda_max "
            f"({worst_residual:.2e} < {tol:g}) and every {which} eigenvalue error "
            f"bound below tol x eigenvalue ({worst_bound:.2e} < {tol:g}), after "
            f"{counts}"
        )
    else:
        reason = (
            f"reached max_iter={max_iter} ({counts}); {which} residual / "
            f"lambda_max = {worst_residual:.2e}, eigenvalue error bound / eigenvalue "
            f"= {worst_bound:.2e}, tol {tol:g}"
        )
    return _Run(vectors, "converged" if found else "max_iter", reason, iteration)


def _end_positions(ends: tuple[str, ...], k: int) -> list[int]:
    """Positions, among the top-then-bottom eigenpairs, of the ``ends`` named."""
    return [i for i in range(2 * k) if ("top" if i < k else "bottom") in ends]


def _randomized_top(
    operator: FisherOperator,
    generator: torch.Generator,
    k: int,
    oversampling: int,
    max_iter: int,
    tol: float,
    trace: _Trace,
) -> _Run:
    """Randomized subspace iteration (a randomized SVD) for the top ``k`` eigenpairs.

    A randomized range finder (Halko, Martinsson and Tropp 2011, algorithms 4.1 and
    4.4) takes the span of ``F Omega`` for a Gaussian ``Omega`` of ``k +
    oversampling`` columns; each further iteration multiplies the orthonormalised
    block by ``F`` once more, a power (subspace) iteration that sharpens the span
    towards the top eigenvectors. Rayleigh-Ritz on the block gives the top ``k``
    eigenpairs after every product; where a randomized SVD stops after a fixed
    number of power iterations, this one stops once they meet ``tol`` (iteration
    ``q + 2`` is the randomized SVD with ``q`` power iterations). The oversampled
    Ritz values give the gap for the error bounds.
    """
    n = operator.n_pixels
    width = min(k + oversampling, n)
    start = torch.randn((n, width), generator=generator, dtype=torch.float64)
    block = torch.linalg.qr(start.to(operator.image)).Q.T
    found = False
    iteration = 0
    steps = tqdm(range(1, max_iter + 1), desc="randomized", mininterval=2, disable=None)
    for iteration in steps:
        fv = operator.matvec(block)
        values, coordinates = _ritz(block, fv)
        wanted = list(range(width - 1, width - 1 - k, -1))
        pairs = coordinates[:, wanted].T
        vectors = pairs @ block
        residuals = torch.linalg.vector_norm(
            pairs @ fv - values[wanted, None] * vectors, dim=1
        )
        lambda_max = _positive(values[-1])
        gaps = values[wanted] - (values[width - 1 - k] if width > k else torch.nan)
        bounds, sizes = _error_bounds(values[wanted], residuals, gaps, lambda_max, n)
        found, worst_residual, worst_bound = _found(
            residuals, bounds, sizes, tol, lambda_max
        )
        found = found or width == n
        trace.record(0, values[wanted], residuals)
        if iteration % max(1, max_iter // 10) == 0:
            logger.info(
                "randomized iteration %d/%d: eigenvalues %s, residuals %s",
                iteration,
                max_iter,
                np.array2string(_np(values[wanted]), precision=4),
                np.array2string(_np(residuals), precision=2),
            )
        if found:
            break
        block = torch.linalg.qr(fv.T).Q.T
    counts = f"{iteration} iterations of a block of {width} (k={k} + oversampling)"
    reason = (
        f"every residual below tol x lambda_max ({worst_residual:.2e} < "
        f"{tol:g}) and every eigenvalue error bound below tol x eigenvalue "
        f"({worst_bound:.2e} < {tol:g}), after {counts}"
        if found
        else f"reached max_iter={max_iter} ({counts}); residual / "
        f"lambda_max = {worst_residual:.2e}, eigenvalue error bound / eigenvalue = "
        f"{worst_bound:.2e}, tol {tol:g}"
    )
    return _Run(vectors, "converged" if found else "max_iter", reason, iteration)


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

    def record_all(
        self, values: Tensor, residuals: Tensor, ends: tuple[str, ...]
    ) -> None:
        """Record top-then-bottom estimates (eigenindex order), NaN outside
        ``ends``."""
        eigenvalue = np.full(2 * self._k, np.nan)
        residual = np.full(2 * self._k, np.nan)
        index = _end_positions(ends, self._k)
        eigenvalue[index] = _np(values)[index]
        residual[index] = _np(residuals)[index]
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
