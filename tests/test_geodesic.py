"""Tests of representational geodesics on models whose shortest paths are known.

For a linear model the straight pixel fade is a shortest path, and for the
normalisation ``x / |x|`` onto the unit sphere the shortest path is an arc of a great
circle whose length is the angle between the endpoints. The optimiser is judged
against these exact answers, and the optimality residual against both them and an
explicit least-squares projection onto the model's tangent space.
"""

from __future__ import annotations

import math

import numpy as np
import plenoptic as po
import pytest
import torch

from conftest import build_stores
from stimsynth.models import load_pinned_model
from stimsynth.store import open_run
from stimsynth.synthesis.geodesic import (
    brownian_bridge,
    optimality_residual,
    step_energies,
    straight_path,
    synthesize_geodesic,
)

# One thread: on a shared two-core machine a second one mostly waits for the first.
torch.set_num_threads(1)

SIZE = 8


class ListRecorder:
    """Keeps every ``record`` and ``snapshot`` call, as the run store does."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, np.ndarray]]] = []
        self.snapshots: list[tuple[int, np.ndarray]] = []

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        self.rows.append((iteration, scalars))

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        self.snapshots.append((iteration, image))


class Sphere(torch.nn.Module):
    """Each frame's pixels divided by their norm: a point on the unit sphere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def linear_model(seed: int, features: int) -> torch.nn.Module:
    """A random linear map of the flattened pixels, in double precision."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(SIZE * SIZE, features, dtype=torch.float64)
    return frozen(torch.nn.Sequential(torch.nn.Flatten(), layer))


def random_image(seed: int, scale: float = 1.0) -> torch.Tensor:
    """A (1, 1, SIZE, SIZE) double image with pixels in [0.2, 0.8] times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand((1, 1, SIZE, SIZE), generator=generator, dtype=torch.float64)
    return scale * (0.2 + 0.6 * pixels)


def path_length(model: torch.nn.Module, path: torch.Tensor) -> float:
    """Sum of the chord lengths between consecutive frames' representations."""
    with torch.no_grad():
        representation = model(path).flatten(1)
    steps = representation[1:] - representation[:-1]
    return float(torch.linalg.vector_norm(steps, dim=1).sum())


def energy(model: torch.nn.Module, path: torch.Tensor) -> float:
    with torch.no_grad():
        return float(step_energies(model, path).sum())


def assert_endpoints_exact(path, start, end):
    assert torch.equal(path[:1], start)
    assert torch.equal(path[-1:], end)


@pytest.fixture(scope="module")
def linear() -> torch.nn.Module:
    # More features than pixels, so the model sees every pixel direction.
    return linear_model(0, 2 * SIZE * SIZE)


# ---------------------------------------------------------------------------
# A linear model: the pixel fade is a shortest path
# ---------------------------------------------------------------------------


def test_no_path_has_less_energy_than_the_fade_under_a_linear_model(linear):
    start, end = random_image(1), random_image(2)
    n_steps = 6
    fade = straight_path(start, end, n_steps)
    fade_energy = energy(linear, fade)

    # The fade's energy is the squared distance between the endpoints' images.
    with torch.no_grad():
        bound = float((linear(end) - linear(start)).pow(2).sum())
    assert fade_energy == pytest.approx(bound, rel=1e-12)

    # Rough (independent per frame) and smooth (bridge) perturbations of every
    # size, down to ones that raise the energy by about one part in a million.
    generator = torch.Generator().manual_seed(3)
    for seed, scale in enumerate(np.logspace(-4, 0, 9)):
        noise = scale * torch.randn(
            (n_steps - 1, 1, SIZE, SIZE), generator=generator, dtype=torch.float64
        )
        rough = fade.clone()
        rough[1:-1] += noise
        smooth = brownian_bridge(start, end, n_steps, seed, scale)
        for path in (rough, smooth):
            assert_endpoints_exact(path, start, end)
            assert energy(linear, path) > fade_energy


def test_linear_geodesic_from_a_bridge_reaches_the_fade(linear):
    start, end = random_image(1), random_image(2)
    n_steps = 6
    fade_energy = energy(linear, straight_path(start, end, n_steps))

    result = synthesize_geodesic(
        linear,
        start,
        end,
        0,
        ListRecorder(),
        n_steps=n_steps,
        max_iter=300,
        initial="bridge",
        bridge_scale=0.1,
        optimizer={"name": "adam", "lr": 0.01},
        stop={"window": 1000},
    )

    # The start is far from the optimum, so reaching it is the optimiser's doing.
    assert energy(linear, result.initial_path) > 1.5 * fade_energy
    assert result.fade_energy == pytest.approx(fade_energy, rel=1e-12)
    assert result.path_energy == pytest.approx(fade_energy, rel=1e-6)
    assert result.path_energy >= fade_energy * (1 - 1e-12)
    assert_endpoints_exact(result.path, start, end)

    # The fade has no acceleration, so it is stationary up to rounding; the bridge
    # is far from it and the optimised path close.
    assert result.fade_optimality_residual.shape == (n_steps - 1,)
    assert result.fade_optimality_residual.max() < 1e-10
    assert optimality_residual(linear, result.initial_path).min() > 1
    assert result.optimality_residual.max() < 1e-3


# ---------------------------------------------------------------------------
# The unit sphere: the shortest path is a great-circle arc
# ---------------------------------------------------------------------------


def test_sphere_geodesic_has_the_length_of_the_angle_at_constant_speed():
    sphere = Sphere()
    # Endpoints of very different norms: the fade crosses the arc at uneven speed.
    start, end = random_image(4), random_image(5, scale=0.25)
    n_steps = 10
    cosine = (start.flatten() @ end.flatten()) / (start.norm() * end.norm())
    angle = math.acos(float(cosine))
    # n equal chords of the arc: the least energy any path of n steps can have,
    # just under angle**2, the energy of the continuous arc at constant speed.
    least_energy = 4 * n_steps**2 * math.sin(angle / (2 * n_steps)) ** 2
    assert least_energy == pytest.approx(angle**2, rel=1e-3)

    # The fade runs along the arc, so it has the arc's length but not its energy;
    # the bridge has neither. Either alone would fail the checks below.
    fade = straight_path(start, end, n_steps)
    assert path_length(sphere, fade) == pytest.approx(angle, rel=1e-3)
    assert energy(sphere, fade) > 1.5 * least_energy

    result = synthesize_geodesic(
        sphere,
        start,
        end,
        0,
        ListRecorder(),
        n_steps=n_steps,
        max_iter=300,
        initial="bridge",
        bridge_scale=0.1,
        optimizer={"name": "adam", "lr": 0.01},
        stop={"window": 1000},
    )

    assert path_length(sphere, result.initial_path) > 1.5 * angle
    assert energy(sphere, result.initial_path) > 1.5 * least_energy
    assert result.path_length == pytest.approx(path_length(sphere, result.path))
    assert result.path_length == pytest.approx(angle, rel=1e-2)
    assert result.path_energy == pytest.approx(least_energy, rel=1e-3)
    assert result.path_energy >= least_energy * (1 - 1e-9)
    assert_endpoints_exact(result.path, start, end)

    # Uneven speed along the arc is a tangential acceleration: the fade's residual
    # is large where the frames' norms change fastest, the geodesic's small.
    assert result.fade_optimality_residual.max() > 1
    assert optimality_residual(sphere, result.initial_path).min() > 1
    assert result.optimality_residual.max() < 1e-3


# ---------------------------------------------------------------------------
# The optimality residual
# ---------------------------------------------------------------------------


def test_residual_falls_as_an_onoff_geodesic_is_optimised():
    onoff = frozen(po.models.OnOff(31, pretrained=True, cache_filt=True))
    image = po.data.einstein()
    start = image[..., 100:116, 100:116].clone()
    end = image[..., 100:116, 102:118].clone()

    result = synthesize_geodesic(
        onoff,
        start,
        end,
        0,
        ListRecorder(),
        n_steps=6,
        max_iter=100,
        initial="bridge",
        bridge_scale=0.05,
        optimizer={"name": "adam", "lr": 0.01},
        stop={"window": 1000},
    )

    bridge = optimality_residual(onoff, result.initial_path)
    assert bridge.min() > 1
    assert result.optimality_residual.max() < bridge.min() / 50
    assert result.path_energy < energy(onoff, result.initial_path)
    assert_endpoints_exact(result.path, start, end)


def test_residual_is_the_first_step_of_the_tangent_projection():
    # A nonlinear model with more features than pixels, so the tangent space is a
    # proper subspace and the projection onto it is not the identity.
    torch.manual_seed(6)
    layer = torch.nn.Linear(SIZE * SIZE, 2 * SIZE * SIZE, dtype=torch.float64)
    model = frozen(torch.nn.Sequential(torch.nn.Flatten(), layer, torch.nn.Tanh()))
    start, end = random_image(7), random_image(8)
    n_steps = 5
    path = brownian_bridge(start, end, n_steps, 0, 0.1)

    residual = optimality_residual(model, path)

    # Independently: each frame's Jacobian explicitly, and the acceleration's
    # least-squares projection onto its range.
    with torch.no_grad():
        representation = model(path)
    steps = representation[1:] - representation[:-1]
    acceleration = steps[1:] - steps[:-1]
    length = torch.linalg.vector_norm(steps, dim=1).sum()
    for i, frame in enumerate(path[1:-1]):
        jacobian = torch.autograd.functional.jacobian(model, frame[None])
        jacobian = jacobian.reshape(acceleration.shape[1], -1)
        a = acceleration[i]
        coefficients = torch.linalg.lstsq(jacobian, a[:, None]).solution
        projection = torch.linalg.vector_norm(jacobian @ coefficients)
        gradient_step = jacobian @ (jacobian.T @ a)
        first_step = (a @ gradient_step) / torch.linalg.vector_norm(gradient_step)
        assert float(residual[i]) == pytest.approx(
            float(n_steps**2 * first_step / length), rel=1e-10
        )
        assert 0 < float(residual[i]) <= float(n_steps**2 * projection / length)

    # Rescaling the representation or the pixels changes nothing.
    scaled_output = torch.nn.Sequential(model, ScaleBy(3.0))
    scaled_input = torch.nn.Sequential(ScaleBy(0.5), model)
    torch.testing.assert_close(optimality_residual(scaled_output, path), residual)
    torch.testing.assert_close(optimality_residual(scaled_input, 2 * path), residual)


class ScaleBy(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


# ---------------------------------------------------------------------------
# The run store
# ---------------------------------------------------------------------------


def test_run_store_keeps_residuals_and_lengths(tmp_path):
    study = {
        "images": {"einstein": {"source": "plenoptic:einstein", "size": [24, 24]}},
        "models": {
            "onoff": {
                "target": "plenoptic.models.OnOff",
                "kernel_size": 31,
                "pretrained": True,
            }
        },
        "geodesic": {
            "shift": {
                "model": "onoff",
                "start": "einstein",
                "end": {"image": "einstein", "translate": [0, 2]},
                "n_steps": 4,
                "max_iter": 5,
            }
        },
    }
    runs = build_stores(tmp_path, study)
    (store,) = runs.glob("**/*.zarr")
    model = load_pinned_model(tmp_path / "models" / "onoff.pt")[0]

    with open_run(store) as dataset:
        final = dataset.load()

    assert list(final["interior_step"].values) == [1, 2, 3]
    path = torch.from_numpy(final["path"].values)
    fade = torch.from_numpy(final["initial_path"].values)
    for name, frames in (
        ("optimality_residual", path),
        ("fade_optimality_residual", fade),
    ):
        np.testing.assert_allclose(
            final[name].values, optimality_residual(model, frames), rtol=1e-5
        )
    assert float(final["final_path_length"]) == pytest.approx(
        path_length(model, path), rel=1e-5
    )
    assert float(final["fade_path_length"]) == pytest.approx(
        path_length(model, fade), rel=1e-5
    )
