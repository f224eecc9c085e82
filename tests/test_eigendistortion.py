"""Eigendistortion solvers against the exact eigendecomposition of the Fisher matrix.

The case is the one that matters for a front-end model: OnOff on a 25x25 crop of
Einstein in float64, whose bottom eigenvalue is about 2e-5 of the top one, with the
next bottom eigenvalues clustered. Every iterative method must find the top
eigenvalue within 0.1% and the bottom one within 1% of the exact method, which in
turn matches plenoptic's.
"""

from __future__ import annotations

import warnings

import numpy as np
import plenoptic as po
import pytest
import torch

from stimsynth.synthesis.eigendistortion import (
    METHODS,
    FisherOperator,
    synthesize_eigendistortion,
)

#: The default study's tolerance.
TOL = 5e-4
ITERATIVE = ("power", "randomized", "lanczos")


class Rows:
    """Keeps every recorded iteration."""

    def __init__(self) -> None:
        self.iterations: list[int] = []
        self.rows: list[dict[str, np.ndarray]] = []

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        self.iterations.append(iteration)
        self.rows.append(scalars)

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        pass

    def column(self, name: str) -> np.ndarray:
        return np.stack([row[name] for row in self.rows])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Module scope, so that the module's shared runs use one thread too: the cores
    # are shared, and more threads than free cores only spin.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    onoff = po.models.OnOff(31, pretrained=True, cache_filt=True).double().eval()
    po.remove_grad(onoff)
    return onoff


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return po.data.einstein()[..., 100:125, 100:125].double().contiguous()


@pytest.fixture(scope="module")
def exact(model, image):
    """Three eigenpairs at each end, from the full eigendecomposition."""
    return synthesize_eigendistortion(model, image, 0, Rows(), method="exact", k=3)


@pytest.fixture(scope="module")
def runs(model, image):
    """Each iterative method with k=1 at the study's tolerance, and its trace."""
    found = {}
    for method in ITERATIVE:
        rows = Rows()
        result = synthesize_eigendistortion(
            model, image, 0, rows, method=method, k=1, tol=TOL, max_iter=3000
        )
        found[method] = result, rows
    return found


def test_exact_matches_plenoptic(exact, model, image):
    reference = po.Eigendistortion(image, model)
    reference.synthesize(method="exact")
    theirs = reference.eigenvalues[[0, 1, 2, -3, -2, -1]].numpy()
    np.testing.assert_allclose(exact.eigenvalues.numpy(), theirs, rtol=1e-6)
    # The case is as hard as claimed: a bottom eigenvalue far below the top one.
    top, bottom = float(exact.eigenvalues[0]), float(exact.eigenvalues[-1])
    assert bottom / top < 1e-4


@pytest.mark.parametrize("method", ITERATIVE)
def test_method_finds_top_and_bottom_eigenvalues(method, runs, exact):
    result, _ = runs[method]
    assert result.status == "converged", result.stop_reason
    assert result.eigenindex == [0, 624]
    assert result.n_pixels == 625
    assert result.eigendistortions.shape == (2, 1, 25, 25)
    top, bottom = result.eigenvalues.tolist()
    assert top == pytest.approx(float(exact.eigenvalues[0]), rel=1e-3)
    assert bottom == pytest.approx(float(exact.eigenvalues[-1]), rel=1e-2)


def test_lanczos_finds_three_eigenpairs_at_each_end(model, image, exact):
    # The second and third bottom eigenvalues are within 3% of each other.
    result = synthesize_eigendistortion(
        model, image, 0, Rows(), method="lanczos", k=3, tol=TOL, max_iter=3000
    )
    assert result.status == "converged", result.stop_reason
    assert result.eigenindex == [0, 1, 2, 622, 623, 624]
    values = result.eigenvalues.numpy()
    assert np.all(np.diff(values) < 0)
    expected = exact.eigenvalues.numpy()
    np.testing.assert_allclose(values[:3], expected[:3], rtol=1e-3)
    np.testing.assert_allclose(values[3:], expected[3:], rtol=1e-2)
    overlaps = np.abs(np.sum(_flat(result) * _flat(exact), axis=1))
    np.testing.assert_array_less(1 - overlaps, 1e-3)


@pytest.mark.parametrize("method", ITERATIVE)
def test_eigendistortions_are_unit_norm_and_match_exact(method, runs, exact):
    result, _ = runs[method]
    norms = np.linalg.norm(_flat(result), axis=1)
    np.testing.assert_allclose(norms, 1, rtol=0, atol=1e-10)
    # Eigenvectors are defined up to sign; the top and bottom eigenvalues are well
    # separated from the next ones (by 8% and by a factor of 2000).
    overlaps = np.abs(np.sum(_flat(result) * _flat(exact)[[0, -1]], axis=1))
    np.testing.assert_array_less(1 - overlaps, 1e-3)


@pytest.mark.parametrize("method", ITERATIVE)
def test_residuals_are_those_of_the_returned_eigenpairs(method, runs, model, image):
    result, _ = runs[method]
    vectors = result.eigendistortions.flatten(1)
    products = FisherOperator(model, image).matvec(vectors)
    values = torch.einsum("kn,kn->k", vectors, products)
    residuals = torch.linalg.vector_norm(products - values[:, None] * vectors, dim=1)
    torch.testing.assert_close(result.eigenvalues, values, rtol=1e-9, atol=0)
    torch.testing.assert_close(result.residuals, residuals, rtol=1e-6, atol=1e-15)
    assert float(result.residuals.max()) < TOL * float(result.eigenvalues[0])


def test_traces_have_one_row_per_iteration(runs):
    for method, (result, rows) in runs.items():
        trace = rows.column("eigenvalue_trace")
        residual = rows.column("residual_trace")
        assert rows.iterations == list(range(len(rows.rows))), method
        assert trace.shape == residual.shape == (len(rows.rows), 2), method
        assert np.array_equal(np.isnan(trace), np.isnan(residual)), method
        # The last estimate of each eigenvalue is the one returned.
        last = [trace[np.isfinite(trace[:, i]), i][-1] for i in range(2)]
        np.testing.assert_allclose(last, result.eigenvalues.numpy(), rtol=1e-6)
    # Lanczos estimates both ends at every iteration ...
    lanczos = runs["lanczos"][1].column("eigenvalue_trace")
    assert len(lanczos) == runs["lanczos"][0].iterations
    assert np.isfinite(lanczos).all()
    # ... the others find the top, then the bottom.
    for method in ("power", "randomized"):
        result, rows = runs[method]
        trace = rows.column("eigenvalue_trace")
        assert len(trace) == result.iterations, method
        top_rows = np.isfinite(trace[:, 0])
        assert np.array_equal(top_rows, np.isnan(trace[:, 1])), method
        assert top_rows[0] and not top_rows[-1], method
        assert np.all(np.diff(top_rows.astype(int)) <= 0), method


def test_lanczos_needs_fewer_products_than_power(runs):
    # What the Krylov method is for: products with F are the whole cost, and with
    # k=1 both methods take one product per iteration.
    lanczos, power = runs["lanczos"][0].iterations, runs["power"][0].iterations
    assert lanczos * 4 < power, (lanczos, power)


@pytest.mark.parametrize("method", ["randomized", "lanczos"])
def test_same_seed_gives_bitwise_same_result(method, model, image):
    def run(seed):
        return synthesize_eigendistortion(
            model, image, seed, Rows(), method=method, k=1, tol=TOL, max_iter=5
        )

    first, again, other = run(3), run(3), run(4)
    assert torch.equal(first.eigenvalues, again.eigenvalues)
    assert torch.equal(first.eigendistortions, again.eigendistortions)
    assert torch.equal(first.residuals, again.residuals)
    assert first.stop_reason == again.stop_reason
    assert not torch.equal(first.eigendistortions, other.eigendistortions)


@pytest.mark.parametrize("method", ITERATIVE)
def test_tiny_max_iter_stops_with_max_iter_status(method, model, image):
    rows = Rows()
    result = synthesize_eigendistortion(
        model, image, 0, rows, method=method, k=1, tol=TOL, max_iter=2
    )
    assert result.status == "max_iter"
    assert "max_iter=2" in result.stop_reason
    # Unfinished, but still unit-norm eigenpairs with their own residuals.
    norms = np.linalg.norm(_flat(result), axis=1)
    np.testing.assert_allclose(norms, 1, rtol=0, atol=1e-10)
    assert np.isfinite(result.eigenvalues.numpy()).all()
    assert len(rows.rows) == result.iterations <= 4


def test_lanczos_on_whole_space_is_exact():
    # A 4x4 blur has 16 pixels and repeated eigenvalues: the Krylov space grows to
    # the whole space, and blocks of k vectors find each repeated pair.
    blur = po.models.Gaussian(5, std=1.5).double().eval()
    po.remove_grad(blur)
    tiny = po.data.einstein()[..., 100:104, 100:104].double().contiguous()
    exact = synthesize_eigendistortion(blur, tiny, 0, Rows(), method="exact", k=3)
    for method in ("lanczos", "randomized"):
        result = synthesize_eigendistortion(
            blur, tiny, 0, Rows(), method=method, k=3, tol=1e-8, krylov_size=16
        )
        assert result.status == "converged", result.stop_reason
        torch.testing.assert_close(
            result.eigenvalues, exact.eigenvalues, rtol=1e-6, atol=1e-12
        )


def test_unknown_method_names_the_valid_ones(model, image):
    assert set(METHODS) == {"exact", "power", "randomized", "lanczos"}
    with pytest.raises(ValueError, match="method 'arnoldi' is not known") as error:
        synthesize_eigendistortion(model, image, 0, Rows(), method="arnoldi")
    for method in METHODS:
        assert method in str(error.value)


def test_krylov_size_too_small_for_k_is_refused(model, image):
    with pytest.raises(ValueError, match=r"krylov_size must be at least 3 k \+ 4"):
        synthesize_eigendistortion(
            model, image, 0, Rows(), method="lanczos", k=4, krylov_size=10
        )


def _flat(result) -> np.ndarray:
    return result.eigendistortions.flatten(1).numpy()
