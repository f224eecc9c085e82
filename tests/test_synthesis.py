"""Tests of the synthesis engine: metamers, MAD, eigendistortions and geodesics.

Every test runs on small crops of plenoptic's Einstein image and a few iterations, so
that the whole file runs in seconds on two CPU cores. Results are checked against
quantities computed here, independently of the engine, wherever that is possible.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import plenoptic as po
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stimsynth.synthesis import (
    synthesize_eigendistortion,
    synthesize_geodesic,
    synthesize_mad,
    synthesize_metamer,
)
from stimsynth.synthesis.optimize import StopCriterion, optimize

# One thread: on a shared two-core machine a second one mostly waits for the first.
torch.set_num_threads(1)

METAMER_KEYS = {
    "objective",
    "loss",
    "penalty",
    "gradient_norm",
    "pixel_change_norm",
    "learning_rate",
}


class ListRecorder:
    """Keeps every ``record`` and ``snapshot`` call, as the run store does.

    Arrays are kept as they are handed over, without a copy: the run store buffers
    snapshots the same way, so a snapshot that changes after it was handed over
    would reach the store changed too.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, np.ndarray]]] = []
        self.snapshots: list[tuple[int, np.ndarray]] = []

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        self.rows.append((iteration, scalars))

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        self.snapshots.append((iteration, image))

    @property
    def iterations(self) -> list[int]:
        return [iteration for iteration, _ in self.rows]

    def column(self, key: str) -> np.ndarray:
        """One scalar over all iterations, shape (iterations, samples)."""
        return np.stack([np.atleast_1d(scalars[key]) for _, scalars in self.rows])


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode with its parameters out of the autograd graph."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def einstein_crop(size: int, y: int = 100, x: int = 100) -> torch.Tensor:
    """A (1, 1, size, size) crop of the Einstein image, float32 in [0, 1]."""
    return po.data.einstein()[..., y : y + size, x : x + size].clone()


@pytest.fixture(scope="module")
def onoff() -> torch.nn.Module:
    return frozen(po.models.OnOff(31, pretrained=True, cache_filt=True))


@pytest.fixture(scope="module")
def gaussian() -> torch.nn.Module:
    return frozen(po.models.Gaussian(5, std=1.5, cache_filt=True))


# ---------------------------------------------------------------------------
# Metamers
# ---------------------------------------------------------------------------


def test_metamer_lowers_loss_and_records_every_iteration(onoff):
    target = einstein_crop(32)
    recorder = ListRecorder()
    max_iter, every = 80, 20

    result = synthesize_metamer(
        onoff,
        target,
        [0, 1],
        recorder,
        max_iter=max_iter,
        optimizer={"name": "adam", "lr": 0.05},
        stop={"window": 1000},
        snapshot_every=every,
    )

    # The representation loss falls to a small fraction of its start, per seed.
    ratio = (result.final_loss / result.initial_loss).numpy()
    assert result.final_loss.shape == (2,)
    assert np.all(ratio < 0.05), f"final / initial loss per seed: {ratio}"

    # One row per iteration, each with the documented scalars for both samples.
    assert recorder.iterations == list(range(max_iter))
    for _, scalars in recorder.rows:
        assert set(scalars) == METAMER_KEYS
    for key in METAMER_KEYS - {"learning_rate"}:
        assert recorder.column(key).shape == (max_iter, 2), key
    assert np.all(recorder.column("learning_rate") == 0.05)
    assert np.all(np.isfinite(recorder.column("gradient_norm")))
    assert np.all(recorder.column("pixel_change_norm") > 0)

    # Iteration 0 describes the initial noise: loss recomputed here, no penalty
    # since uniform noise lies in [0, 1).
    with torch.no_grad():
        expected_loss = (
            (onoff(result.initial) - onoff(target)).pow(2).flatten(1).mean(1).numpy()
        )
    first = recorder.rows[0][1]
    np.testing.assert_allclose(first["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_array_equal(first["penalty"], [0.0, 0.0])
    np.testing.assert_allclose(
        first["objective"], first["loss"] + 0.1 * first["penalty"], rtol=1e-6
    )
    np.testing.assert_allclose(
        result.optimization.objective_history[-1], recorder.column("objective")[-1]
    )

    # Snapshots every `every` iterations, each showing the images as they were at
    # the start of that iteration.
    assert [i for i, _ in recorder.snapshots] == list(range(0, max_iter, every))
    first_snapshot = recorder.snapshots[0][1]
    assert first_snapshot.shape == (2, 1, 32, 32)
    np.testing.assert_array_equal(
        first_snapshot,
        result.initial.numpy(),
        err_msg="snapshot of iteration 0 is not the initial image; max deviation "
        f"{np.abs(first_snapshot - result.initial.numpy()).max():.4g}, from the "
        f"final metamer {np.abs(first_snapshot - result.metamer.numpy()).max():.4g}",
    )
    later = [np.abs(image - first_snapshot).max() for _, image in recorder.snapshots]
    assert all(change > 0 for change in later[1:])


def test_metamer_snapshots_match_recorded_pixel_changes(gaussian):
    target = einstein_crop(16)
    recorder = ListRecorder()

    synthesize_metamer(
        gaussian,
        target,
        [0],
        recorder,
        max_iter=4,
        stop={"window": 100},
        snapshot_every=1,
    )

    # With a snapshot at every iteration, consecutive snapshots differ by exactly
    # the change that the step in between recorded.
    images = [image.copy() for _, image in recorder.snapshots]
    changes = recorder.column("pixel_change_norm")[:-1, 0]
    between = [np.linalg.norm(b - a) for a, b in zip(images, images[1:], strict=False)]
    np.testing.assert_allclose(between, changes, rtol=1e-4)


def test_metamer_first_objective_includes_penalty(onoff):
    target = einstein_crop(32)
    # Noise stretched to [-0.3, 1.3) so that the range penalty is not zero.
    generator = torch.Generator().manual_seed(7)
    initial = 1.6 * torch.rand((2, 1, 32, 32), generator=generator) - 0.3
    recorder = ListRecorder()

    synthesize_metamer(onoff, target, [0, 1], recorder, max_iter=2, initial=initial)

    with torch.no_grad():
        loss = (onoff(initial) - onoff(target)).pow(2).flatten(1).mean(1).double()
    pixels = initial.double().flatten(1)
    penalty = (pixels.clamp(max=0) ** 2 + (pixels - 1).clamp(min=0) ** 2).sum(1)
    first = recorder.rows[0][1]
    assert np.all(penalty.numpy() > 1.0)
    np.testing.assert_allclose(first["loss"], loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(first["penalty"], penalty.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        first["objective"], (loss + 0.1 * penalty).numpy(), rtol=1e-5
    )


def test_metamer_is_deterministic_and_batch_independent(onoff):
    target = einstein_crop(32)
    settings = {"max_iter": 25, "stop": {"window": 1000}}

    def run(seeds: list[int]):
        return synthesize_metamer(onoff, target, seeds, ListRecorder(), **settings)

    first, again = run([3]), run([3])
    assert torch.equal(first.initial, again.initial)
    assert torch.equal(first.metamer, again.metamer)

    other = run([4])
    assert not torch.allclose(first.initial, other.initial, atol=0.1)
    assert not torch.allclose(first.metamer, other.metamer, atol=1e-3)

    # Two seeds in one batch give what each gives alone.
    batch = run([3, 4])
    assert all(status == "max_iter" for status in batch.optimization.status)
    assert torch.equal(batch.initial[0], first.initial[0])
    assert torch.equal(batch.initial[1], other.initial[0])
    assert torch.allclose(batch.metamer[0], first.metamer[0], rtol=0, atol=1e-5)
    assert torch.allclose(batch.metamer[1], other.metamer[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Stop criterion
# ---------------------------------------------------------------------------


def test_stop_criterion_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_iter"):
        StopCriterion(max_iter=0)
    with pytest.raises(ValueError, match="window"):
        StopCriterion(max_iter=10, window=0)


def test_stop_criterion_compares_two_windows():
    stop = StopCriterion(max_iter=100, window=3, abs_tol=1e-6, rel_tol=0)
    # Two full windows are needed before anything can converge.
    assert not stop.converged(np.ones((5, 1))).any()
    assert stop.converged(np.ones((6, 1))).all()
    # Window means 2 and 1: still falling.
    falling = np.array([[2.0], [2.0], [2.0], [1.0], [1.0], [1.0]])
    assert not stop.converged(falling).any()
    np.testing.assert_allclose(stop.change(falling), [1.0])
    # Samples are judged each on its own.
    both = np.concatenate([np.ones((6, 1)), falling], axis=1)
    np.testing.assert_array_equal(stop.converged(both), [True, False])
    # The relative tolerance scales with the objective.
    relative = StopCriterion(max_iter=100, window=2, abs_tol=0, rel_tol=1e-2)
    assert relative.converged(np.array([[100.5], [100.5], [100.0], [100.0]])).all()
    assert not relative.converged(np.array([[102.0], [102.0], [100.0], [100.0]])).any()


@settings(max_examples=50, deadline=None)
@given(
    window=st.integers(1, 20),
    level=st.floats(-1e6, 1e6, allow_nan=False),
    extra=st.integers(0, 20),
)
def test_stop_criterion_on_constant_objective(window, level, extra):
    stop = StopCriterion(max_iter=1000, window=window)
    short = np.full((2 * window - 1, 3), level)
    long = np.full((2 * window + extra, 3), level)
    assert not stop.converged(short).any()
    assert stop.converged(long).all()


def test_flat_sample_converges_and_freezes_while_other_continues():
    window, max_iter = 4, 30
    target = torch.full((1, 4, 4), 0.5)
    seen: list[torch.Tensor] = []

    def objective(x):
        # Sample 0: a constant value with a nonzero gradient, so the optimiser
        # keeps pushing it although its objective never changes. Sample 1: a
        # quadratic bowl that keeps falling.
        seen.append(x.detach().clone())
        flat = 1.0 + (x[0] - x[0].detach()).sum()
        bowl = (x[1] - target).pow(2).sum()
        values = torch.stack([flat, bowl])
        return values, {"part": values.detach()}

    recorder = ListRecorder()
    result = optimize(
        torch.zeros(2, 1, 4, 4),
        objective,
        {"name": "adam", "lr": 0.01},
        StopCriterion(max_iter=max_iter, window=window),
        recorder,
    )

    assert result.status == ["converged", "max_iter"]
    assert result.stop_iteration == [2 * window, max_iter]
    assert f"windows of {window} iterations" in result.stop_reason[0]
    assert result.iterations == max_iter
    assert result.run_status == "max_iter"

    # Sample 0 moved until it converged and not at all afterwards; sample 1 kept
    # moving to the end.
    change = recorder.column("pixel_change_norm")
    assert np.all(change[: 2 * window, 0] > 0)
    assert np.all(change[2 * window :, 0] == 0)
    assert np.all(change[:, 1] > 0)
    frozen_image = seen[2 * window][0]
    assert not torch.equal(frozen_image, seen[2 * window - 1][0])
    for image in seen[2 * window :]:
        assert torch.equal(image[0], frozen_image)
    assert torch.equal(result.variable[0], frozen_image)
    assert result.objective_history[-1, 1] < result.objective_history[0, 1]


def test_nan_objective_marks_sample_diverged():
    calls = {"n": 0}

    def objective(x):
        bowl = (x - 0.5).pow(2).flatten(1).sum(1)
        if calls["n"] >= 3:
            # From iteration 3 on, sample 1's objective is not a number.
            bowl = bowl * torch.tensor([1.0, math.nan])
        calls["n"] += 1
        return bowl, {}

    result = optimize(
        torch.zeros(2, 1, 3, 3),
        objective,
        {"name": "adam"},
        StopCriterion(max_iter=10, window=100),
        ListRecorder(),
    )

    assert result.status == ["max_iter", "diverged"]
    assert "at iteration 3" in result.stop_reason[1]
    assert "nan" in result.stop_reason[1]
    assert result.stop_iteration[1] == 4
    assert result.run_status == "diverged"
    # The healthy sample ran on, unharmed by the other's NaN.
    assert result.iterations == 10
    assert torch.isfinite(result.variable[0]).all()
    assert np.all(np.isfinite(result.objective_history[:, 0]))


# ---------------------------------------------------------------------------
# MAD competition
# ---------------------------------------------------------------------------

MAD_METRICS = {
    "mse": po.metric.mse,
    "ssim": lambda reference, images: 1 - po.metric.ssim(reference, images),
}


@pytest.fixture(scope="module", params=["projection", "penalty"])
def mad_run(request):
    reference = einstein_crop(32)
    recorder = ListRecorder()
    with warnings.catch_warnings():
        # SSIM warns whenever a maximised image strays outside [0, 1].
        warnings.filterwarnings("ignore", "Image range falls outside", UserWarning)
        result = synthesize_mad(
            reference,
            MAD_METRICS,
            0,
            recorder,
            max_iter=100,
            hold=request.param,
            # One penalty weight cannot hold both metrics of this pair: the MSE
            # directions need about 1e2, the SSIM ones about 1e5.
            tradeoff={"mse": 1e2, "ssim": 1e5},
            stop={"window": 1000},
        )
    return reference, recorder, result


def test_mad_rejects_unknown_hold_and_metric_count():
    reference = einstein_crop(32)
    with pytest.raises(ValueError, match="hold"):
        synthesize_mad(
            reference, MAD_METRICS, 0, ListRecorder(), max_iter=1, hold="clamp"
        )
    with pytest.raises(ValueError, match="two metrics"):
        synthesize_mad(reference, {"mse": po.metric.mse}, 0, ListRecorder(), max_iter=1)


def test_mad_starts_from_the_noisy_reference(mad_run):
    reference, recorder, result = mad_run
    start = result.initial
    assert start.shape == reference.shape
    assert 0 <= float(start.min()) and float(start.max()) <= 1
    assert [d.label for d in result.directions] == [
        "min mse",
        "max mse",
        "min ssim",
        "max ssim",
    ]

    mse0 = float(po.metric.mse(reference, start))
    dssim0 = float(1 - po.metric.ssim(reference, start))
    first = recorder.rows[0][1]
    np.testing.assert_allclose(first["optimized_metric"], [mse0] * 2 + [dssim0] * 2)
    np.testing.assert_allclose(first["reference_metric"], [dssim0] * 2 + [mse0] * 2)
    np.testing.assert_allclose(
        result.reference_target.numpy(), [dssim0] * 2 + [mse0] * 2, rtol=1e-6
    )


def test_mad_moves_optimized_metric_the_right_way(mad_run):
    # "Clearly" here means by at least a tenth of its starting value in 100 steps.
    _, recorder, result = mad_run
    start = recorder.rows[0][1]["optimized_metric"]
    ratio = result.final_optimized.numpy() / start
    wrong = [
        f"{d.label} (w={w:.3g}): final / start = {r:.3g}"
        for d, w, r in zip(result.directions, result.tradeoff, ratio, strict=True)
        if (r >= 0.9 if d.extremum == "min" else r <= 1.1)
    ]
    assert not wrong, "optimized metric did not move clearly: " + "; ".join(wrong)


def test_mad_holds_reference_metric(mad_run):
    _, _, result = mad_run
    drift = (result.final_reference / result.reference_target - 1).numpy()
    report = ", ".join(
        f"{d.label} (w={w:g}): {change:+.1%}"
        for d, w, change in zip(result.directions, result.tradeoff, drift, strict=True)
    )
    assert np.all(np.abs(drift) < 0.05), f"reference metric drift: {report}"


# ---------------------------------------------------------------------------
# Eigendistortions
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onoff64() -> torch.nn.Module:
    return frozen(po.models.OnOff(31, pretrained=True, cache_filt=True).double())


@pytest.fixture(scope="module")
def eigen_image() -> torch.Tensor:
    return einstein_crop(16).double()


@pytest.fixture(scope="module")
def eigen_runs(onoff64, eigen_image):
    exact = synthesize_eigendistortion(
        onoff64, eigen_image, 0, ListRecorder(), method="exact"
    )
    recorder = ListRecorder()
    power = synthesize_eigendistortion(
        onoff64, eigen_image, 0, recorder, method="power", max_iter=1000
    )
    return exact, power, recorder


def test_eigendistortions_are_unit_norm_and_ordered(eigen_runs, eigen_image):
    for result in eigen_runs[:2]:
        assert result.eigendistortions.shape == (2, 1, 16, 16)
        assert result.eigenindex == [0, 255]
        assert result.n_pixels == 256
        top, bottom = result.eigenvalues.tolist()
        assert top > bottom >= 0
        norms = torch.linalg.vector_norm(result.eigendistortions.flatten(1), dim=1)
        torch.testing.assert_close(
            norms, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6
        )


def test_eigenvalue_is_squared_representation_change(eigen_runs, onoff64, eigen_image):
    # The squared change of the representation per unit of distortion, measured by
    # a central finite difference rather than by the Fisher operator.
    exact = eigen_runs[0]
    step = 1e-4
    with torch.no_grad():
        for value, distortion in zip(
            exact.eigenvalues, exact.eigendistortions, strict=True
        ):
            up = onoff64(eigen_image + step * distortion)
            down = onoff64(eigen_image - step * distortion)
            measured = float((up - down).pow(2).sum()) / (2 * step) ** 2
            assert measured == pytest.approx(float(value), rel=1e-3, abs=1e-10)


def test_power_method_agrees_with_exact(eigen_runs):
    exact, power, recorder = eigen_runs
    assert power.status == "converged", power.stop_reason
    top_exact, bottom_exact = exact.eigenvalues.tolist()
    top_power, bottom_power = power.eigenvalues.tolist()
    assert top_power == pytest.approx(top_exact, rel=1e-3)
    assert bottom_power == pytest.approx(bottom_exact, rel=1e-2)

    # The top eigendistortion is the same direction, up to sign.
    overlap = torch.dot(
        power.eigendistortions[0].flatten(), exact.eigendistortions[0].flatten()
    )
    assert abs(float(overlap)) > 0.999

    # One row per power iteration, top estimates first, then the bottom ones.
    assert recorder.iterations == list(range(power.iterations))
    trace = recorder.column("eigenvalue_trace")
    assert np.isnan(trace[-1, 0]) and np.isfinite(trace[-1, 1])
    assert np.isfinite(trace[0, 0]) and np.isnan(trace[0, 1])


def test_power_method_converged_means_bottom_eigenvalue_found():
    # A blur's bottom eigenvalues are many orders of magnitude below its top one,
    # the hard case for the shifted power iteration: whatever the tolerance, a run
    # that reports "converged" must have found the bottom eigenvalue.
    model = frozen(po.models.Gaussian(5, std=1.5).double())
    image = einstein_crop(16).double()
    exact = synthesize_eigendistortion(model, image, 0, ListRecorder(), method="exact")
    power = synthesize_eigendistortion(
        model, image, 0, ListRecorder(), method="power", tol=1e-4, max_iter=3000
    )

    if power.status == "converged":
        top_exact, bottom_exact = exact.eigenvalues.tolist()
        top_power, bottom_power = power.eigenvalues.tolist()
        assert top_power == pytest.approx(top_exact, rel=1e-3)
        assert bottom_power == pytest.approx(bottom_exact, rel=1e-2), (
            f"power reports {power.stop_reason!r} but its bottom eigenvalue is "
            f"{bottom_power:.3g}, exact {bottom_exact:.3g}"
        )


def test_exact_method_refuses_beyond_memory_budget(onoff64, eigen_image):
    with pytest.raises(ValueError, match=r"needs about \d+ MB.*budget"):
        synthesize_eigendistortion(
            onoff64,
            eigen_image,
            0,
            ListRecorder(),
            method="exact",
            memory_budget_mb=0.01,
        )


def test_eigendistortion_rejects_unknown_method_and_bad_k(gaussian, eigen_image):
    image = eigen_image.float()
    with pytest.raises(ValueError, match="method"):
        synthesize_eigendistortion(gaussian, image, 0, ListRecorder(), method="arnoldi")
    with pytest.raises(ValueError, match="k must be"):
        synthesize_eigendistortion(gaussian, image, 0, ListRecorder(), k=200)


# ---------------------------------------------------------------------------
# Geodesics
# ---------------------------------------------------------------------------


def path_energy(model: torch.nn.Module, path: torch.Tensor) -> float:
    """``n_steps * sum |f(x_{i+1}) - f(x_i)|^2``, computed here from the frames."""
    with torch.no_grad():
        representation = model(path).flatten(1).double()
    steps = representation[1:] - representation[:-1]
    return float((path.shape[0] - 1) * steps.pow(2).sum())


def test_geodesic_is_shorter_than_fade_with_fixed_endpoints(onoff):
    start, end = einstein_crop(16, 100, 100), einstein_crop(16, 60, 140)
    n_steps = 6
    recorder = ListRecorder()

    result = synthesize_geodesic(
        onoff,
        start,
        end,
        0,
        recorder,
        n_steps=n_steps,
        max_iter=50,
        optimizer={"name": "adam", "lr": 0.01},
        stop={"window": 1000},
        snapshot_every=25,
    )

    assert result.path.shape == (n_steps + 1, 1, 16, 16)
    assert torch.equal(result.path[:1], start)
    assert torch.equal(result.path[-1:], end)
    assert result.step_energy.shape == (n_steps,)

    fade = path_energy(onoff, result.initial_path)
    assert result.fade_energy == pytest.approx(fade, rel=1e-5)
    assert result.path_energy == pytest.approx(
        path_energy(onoff, result.path), rel=1e-5
    )
    assert result.path_energy < result.fade_energy

    # Snapshots are whole paths, endpoints included.
    assert [i for i, _ in recorder.snapshots] == [0, 25]
    for _, snapshot in recorder.snapshots:
        assert snapshot.shape == (1, n_steps + 1, 1, 16, 16)
        np.testing.assert_array_equal(snapshot[0, 0], start[0].numpy())
        np.testing.assert_array_equal(snapshot[0, -1], end[0].numpy())
    assert set(recorder.rows[0][1]) >= {"objective", "path_energy", "penalty"}


@pytest.mark.parametrize("initial", ["straight", "bridge"])
def test_geodesic_of_linear_model_is_no_shorter_than_fade(gaussian, initial):
    start, end = einstein_crop(16, 100, 100), einstein_crop(16, 60, 140)

    result = synthesize_geodesic(
        gaussian,
        start,
        end,
        0,
        ListRecorder(),
        n_steps=6,
        max_iter=60,
        initial=initial,
        optimizer={"name": "adam", "lr": 0.01},
        stop={"window": 1000},
    )

    # For a linear model the fade's energy is |f(end) - f(start)|^2, the least any
    # path between these endpoints can have.
    with torch.no_grad():
        bound = float((gaussian(end) - gaussian(start)).double().pow(2).sum())
    assert result.fade_energy == pytest.approx(bound, rel=1e-4)
    assert result.path_energy >= result.fade_energy * (1 - 1e-5)
    assert torch.equal(result.path[:1], start)
    assert torch.equal(result.path[-1:], end)


def test_geodesic_rejects_mismatched_endpoints(gaussian):
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16\).*\(1, 1, 16, 20\)"):
        synthesize_geodesic(
            gaussian,
            einstein_crop(16),
            po.data.einstein()[..., :16, :20],
            0,
            ListRecorder(),
            n_steps=4,
            max_iter=2,
        )
    with pytest.raises(ValueError, match="n_steps"):
        synthesize_geodesic(
            gaussian,
            einstein_crop(16),
            einstein_crop(16, 0, 0),
            0,
            ListRecorder(),
            n_steps=1,
            max_iter=2,
        )
