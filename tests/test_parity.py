"""stimsynth against plenoptic, the field's reference, on the same inputs in float64."""

import warnings

import numpy as np
import plenoptic as po
import pytest
import torch

from stimsynth.synthesis.eigendistortion import synthesize_eigendistortion
from stimsynth.synthesis.mad import synthesize_mad
from stimsynth.synthesis.metamer import initial_noise, synthesize_metamer


class Rows:
    """Keeps every recorded iteration."""

    def __init__(self):
        self.rows = []

    def record(self, iteration, scalars):
        self.rows.append(scalars)

    def snapshot(self, iteration, image):
        pass


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image():
    return po.data.einstein()[..., 100:132, 100:132].double().contiguous()


@pytest.fixture(scope="module")
def onoff():
    model = po.models.OnOff(31, pretrained=True, cache_filt=True).double().eval()
    po.remove_grad(model)
    return model


def test_metamer_objective_matches_plenoptic_every_iteration(image, onoff):
    start = initial_noise((1, 32, 32), [0]).double()
    reference = po.Metamer(image, onoff)
    reference.setup(start.clone())
    reference.synthesize(max_iter=60, stop_criterion=0)

    rows = Rows()
    synthesize_metamer(
        onoff, image, [0], rows, max_iter=60, initial=start, stop={"window": 1000}
    )
    ours = np.array([row["objective"][0] for row in rows.rows])
    theirs = reference.losses.numpy()[: len(ours)]
    assert len(ours) == 60
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    # and the objective really fell, so the comparison is not of a flat line
    assert ours[-1] < 0.2 * ours[0]


def test_mad_image_objective_matches_plenoptic_every_iteration(image):
    distance = lambda x, y: 1 - po.metric.ssim(x, y)  # noqa: E731
    torch.manual_seed(0)
    reference = po.MADCompetition(
        image, po.metric.mse, distance, "max", metric_tradeoff_lambda=100.0
    )
    reference.setup(initial_noise=0.02)
    reference.synthesize(max_iter=50, stop_criterion=0)

    rows = Rows()
    result = synthesize_mad(
        image,
        {"mse": po.metric.mse, "1-ssim": distance},
        0,
        rows,
        max_iter=50,
        initial=reference.initial_image,
        hold="penalty",
        tradeoff=100.0,
        stop={"window": 1000},
    )
    direction = [d.label for d in result.directions].index("max mse")
    ours = np.array([row["objective"][direction] for row in rows.rows])
    theirs = reference.losses.numpy()[: len(ours)]
    assert len(ours) == 50
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    np.testing.assert_allclose(
        result.mad_image[direction : direction + 1].numpy(),
        reference.mad_image.detach().numpy(),
        rtol=1e-5,
        atol=1e-8,
    )


def test_exact_eigendistortion_matches_plenoptic(onoff):
    image = po.data.einstein()[..., 100:116, 100:116].double().contiguous()
    reference = po.Eigendistortion(image, onoff)
    reference.synthesize(method="exact")
    result = synthesize_eigendistortion(onoff, image, 0, Rows(), method="exact", k=1)
    theirs = reference.eigenvalues[[0, -1]].numpy()
    np.testing.assert_allclose(result.eigenvalues.numpy(), theirs, rtol=1e-6)
    # Eigenvectors are defined up to sign.
    top = reference.eigendistortions[0].flatten().numpy()
    overlap = abs(float(result.eigendistortions[0].flatten().numpy() @ top))
    assert overlap == pytest.approx(1, abs=1e-6)
