"""stimsynth against plenoptic, the field's reference, on the same inputs in float64."""

import warnings

import numpy as np
import plenoptic as po
import pytest
import torch

from helpers.recording import Rows
from stimsynth.synthesis.eigendistortion import synthesize_eigendistortion
from stimsynth.synthesis.mad import synthesize_mad
from stimsynth.synthesis.metamer import (
    CoarseToFine,
    initial_noise,
    synthesize_metamer,
)


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


@pytest.fixture(scope="module")
def texture():
    image = po.data.reptile_skin()[..., :64, :64].double().contiguous()
    model = po.models.PortillaSimoncelli((64, 64), n_scales=2).double()
    return image, model


def _texture_start(image):
    return image.mean() + 0.1 * (initial_noise((1, 64, 64), [0]).double() - 0.5)


@pytest.mark.parametrize("loss", ["mse", "portilla_simoncelli"])
def test_texture_metamer_objective_matches_plenoptic_every_iteration(texture, loss):
    image, model = texture
    start = _texture_start(image)
    loss_function = (
        po.loss.portilla_simoncelli_loss_factory(model, image)
        if loss == "portilla_simoncelli"
        else po.loss.mse
    )
    reference = po.Metamer(image, model, loss_function=loss_function)
    reference.setup(start.clone())
    reference.synthesize(max_iter=50, stop_criterion=0)

    rows = Rows()
    synthesize_metamer(
        model,
        image,
        [0],
        rows,
        max_iter=50,
        initial=start,
        loss=loss,
        stop={"window": 1000},
    )
    ours = np.array([row["objective"][0] for row in rows.rows])
    theirs = reference.losses.numpy()[: len(ours)]
    assert len(ours) == 50
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours[-1] < 0.5 * ours[0]


@pytest.mark.parametrize(
    ("mode", "change_tol", "window"),
    [("together", None, 7), ("separate", None, 6), ("together", 0.05, 5)],
)
def test_coarse_to_fine_matches_plenoptic_every_iteration(
    texture, mode, change_tol, window
):
    image, model = texture
    start = _texture_start(image)
    reference = po.MetamerCTF(
        image, model, loss_function=po.loss.l2_norm, coarse_to_fine=mode
    )
    reference.setup(start.clone())
    reference.synthesize(
        max_iter=60,
        stop_criterion=0,
        change_scale_criterion=change_tol,
        ctf_iters_to_check=window,
    )

    rows = Rows()
    result = synthesize_metamer(
        model,
        image,
        [0],
        rows,
        max_iter=60,
        initial=start,
        loss="l2",
        stop={"window": 1000},
        coarse_to_fine=CoarseToFine(mode=mode, change_tol=change_tol, window=window),
    )
    ours = np.array([row["objective"][0] for row in rows.rows])
    theirs = reference.losses.numpy()[: len(ours)]
    assert len(ours) == 60
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)

    # The stages ran when plenoptic ran them, and each iteration says which.
    timing = reference.scales_timing
    assert result.stages == [str(scale) for scale in timing]
    started = [times[0] if times else -1 for times in timing.values()]
    assert result.stage_start == started
    stage = np.array([int(row["stage"]) for row in rows.rows])
    assert np.all(np.diff(stage) >= 0)
    reached = [s for s in result.stage_start if s >= 0]
    assert [int(np.argmax(stage == i)) for i in range(len(reached))] == reached
    if change_tol is None:
        assert result.stage_start[-1] >= 0, "the run should reach all scales"
    else:
        # The criterion held the run at a coarse scale for a while.
        assert max(np.bincount(stage)) > window
