"""Metamer options: L-BFGS, coarse-to-fine, penalties, starting images and dtypes.

Agreement with plenoptic, step by step, is in test_parity.py; these tests check
what each option does against quantities computed here, independently of the
engine.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import plenoptic as po
import pytest
import torch

from helpers.recording import Rows
from stimsynth.config import ConfigError, plan_study, validate_config
from stimsynth.errors import InputError
from stimsynth.synthesis.metamer import (
    CoarseToFine,
    initial_noise,
    make_penalty,
    synthesize_metamer,
)
from stimsynth.synthesis.optimize import range_penalty

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def onoff():
    model = po.models.OnOff(31, pretrained=True, cache_filt=True).double().eval()
    po.remove_grad(model)
    return model


@pytest.fixture(scope="module")
def target():
    return po.data.einstein()[..., 96:128, 96:128].double().contiguous()


@pytest.fixture(scope="module")
def texture():
    image = po.data.reptile_skin()[..., :64, :64].contiguous()
    return image, po.models.PortillaSimoncelli((64, 64), n_scales=2)


# ---------------------------------------------------------------------------
# L-BFGS
# ---------------------------------------------------------------------------


def test_lbfgs_takes_the_steps_torch_takes(onoff, target):
    start = initial_noise((1, 32, 32), [0]).double()
    rows = Rows()
    result = synthesize_metamer(
        onoff,
        target,
        [0],
        rows,
        max_iter=15,
        initial=start,
        optimizer={"name": "lbfgs"},
        stop={"window": 1000},
    )

    # The same problem stepped by torch's L-BFGS directly.
    image = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([image], max_iter=1, line_search_fn="strong_wolfe")
    goal = onoff(target)
    expected = []

    def closure():
        opt.zero_grad()
        value = (onoff(image) - goal).pow(2).mean() + 0.1 * range_penalty(image).sum()
        value.backward()
        return value

    for _ in range(15):
        expected.append(float(closure()))
        opt.step(closure)
    np.testing.assert_allclose(rows.column("objective"), expected, rtol=1e-10)
    torch.testing.assert_close(result.metamer, image.detach(), rtol=0, atol=1e-12)
    # The line search makes every step lower the objective.
    assert np.all(np.diff(expected) < 0)


def test_lbfgs_refuses_a_batch(onoff, target):
    with pytest.raises(ValueError, match="L-BFGS couples the samples"):
        synthesize_metamer(
            onoff, target, [0, 1], Rows(), max_iter=2, optimizer={"name": "lbfgs"}
        )


# ---------------------------------------------------------------------------
# Penalty and starting image
# ---------------------------------------------------------------------------


def test_penalty_by_import_path_is_applied_per_sample(onoff, target):
    penalty = make_penalty("plenoptic.regularize.penalize_range")
    images = torch.stack([target[0] * 1.5, target[0] - 0.2, target[0]])
    np.testing.assert_allclose(penalty(images), range_penalty(images), rtol=1e-12)
    assert float(penalty(images)[2]) == 0
    assert float(penalty(images)[0]) > 0 and float(penalty(images)[1]) > 0

    # The objective of a run carries penalty_lambda times that penalty.
    rows = Rows()
    start = target * 1.3
    synthesize_metamer(
        onoff,
        target,
        [0],
        rows,
        max_iter=1,
        initial=start,
        penalty="plenoptic.regularize.penalize_range",
        penalty_lambda=2.5,
    )
    expected_penalty = float(range_penalty(start)[0])
    assert rows.column("penalty")[0] == pytest.approx(expected_penalty, rel=1e-12)
    assert rows.column("objective")[0] == pytest.approx(
        rows.column("loss")[0] + 2.5 * expected_penalty, rel=1e-12
    )


def test_run_starts_from_the_image_given(onoff, target):
    other = po.data.curie()[..., 96:128, 96:128].double()
    rows = Rows()
    result = synthesize_metamer(
        onoff, target, [0], rows, max_iter=1, initial=other, stop={"window": 1000}
    )
    assert torch.equal(result.initial, other)
    expected = (onoff(other) - onoff(target)).pow(2).mean()
    assert rows.column("loss")[0] == pytest.approx(float(expected), rel=1e-12)


# ---------------------------------------------------------------------------
# dtype and repeatability
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_run_follows_the_target_dtype_and_repeats_bitwise(dtype):
    model = po.models.OnOff(31, pretrained=True, cache_filt=True).to(dtype).eval()
    po.remove_grad(model)
    target = po.data.einstein()[..., 96:128, 96:128].to(dtype)

    def run():
        rows = Rows()
        result = synthesize_metamer(
            model,
            target,
            [5],
            rows,
            max_iter=20,
            optimizer={"name": "adam", "scheduler": {"name": "plateau"}},
        )
        return result, rows

    first, first_rows = run()
    again, again_rows = run()
    assert first.metamer.dtype == dtype
    assert first.final_loss.dtype == dtype
    assert torch.equal(first.metamer, again.metamer)
    assert np.array_equal(
        first_rows.column("objective"), again_rows.column("objective")
    )


def test_four_seeds_together_equal_four_single_runs(onoff, target):
    seeds = [0, 1, 2, 3]
    # Starts at several distances from the target, so that the samples converge
    # at different iterations and freezing is exercised.
    noise = initial_noise((1, 32, 32), seeds).double() - 0.5
    scale = torch.tensor([0.0, 0.002, 0.05, 0.3], dtype=torch.float64)
    initial = target + scale.view(-1, 1, 1, 1) * noise
    settings = {"max_iter": 60, "stop": {"window": 5, "rel_tol": 0.02}}
    batch = synthesize_metamer(
        onoff, target, seeds, Rows(), initial=initial, **settings
    )
    singles = [
        synthesize_metamer(
            onoff, target, [s], Rows(), initial=initial[i : i + 1], **settings
        )
        for i, s in enumerate(seeds)
    ]
    for i, single in enumerate(singles):
        assert (
            batch.optimization.stop_iteration[i]
            == (single.optimization.stop_iteration[0])
        )
        assert batch.optimization.status[i] == single.optimization.status[0]
        torch.testing.assert_close(
            batch.metamer[i], single.metamer[0], rtol=0, atol=1e-10
        )
    assert len(set(batch.optimization.stop_iteration)) > 1


# ---------------------------------------------------------------------------
# Coarse-to-fine
# ---------------------------------------------------------------------------


def test_coarse_to_fine_goes_through_every_stage_before_it_may_stop(texture):
    image, model = texture
    rows = Rows()
    result = synthesize_metamer(
        model,
        image,
        [0],
        rows,
        max_iter=200,
        initial="gray",
        loss="l2",
        # A loose criterion that would stop a plain run within a few dozen steps.
        stop={"window": 5, "rel_tol": 0.5},
        coarse_to_fine=CoarseToFine(mode="together", change_tol=None, window=8),
    )
    stages = [str(s) for s in model.scales[:-1]] + ["all"]
    assert result.stages == stages
    assert result.stage_start == [8 * i for i in range(len(stages))]
    stage = rows.column("stage")
    assert result.optimization.status == ["converged"]
    stopped = result.optimization.stop_iteration[0]
    # It converged in the final stage, after the span that stage must run.
    assert stage[-1] == len(stages) - 1
    assert stopped >= result.stage_start[-1] + max(8, 2 * 5)
    # The learning rate went back to its start at every stage.
    assert np.all(rows.column("learning_rate") == 0.01)


def test_coarse_to_fine_step_follows_the_stage_loss(texture):
    image, model = texture
    rows = Rows()
    synthesize_metamer(
        model,
        image,
        [0],
        rows,
        max_iter=3,
        initial="gray",
        loss="l2",
        coarse_to_fine=CoarseToFine(mode="separate", window=50),
    )
    # In the first stage, the recorded objective is over all scales and the
    # stage objective over the coarsest scale only.
    start = rows.column("objective")[0]
    stage = rows.column("stage_objective")[0]
    gray = image.mean() + 0.01 * initial_noise((1, 64, 64), [0])
    first = model.scales[0]
    with torch.no_grad():
        whole = torch.linalg.vector_norm(model(gray) - model(image))
        part = torch.linalg.vector_norm(
            model(gray, scales=[first]) - model(image, scales=[first])
        )
    assert start == pytest.approx(float(whole), rel=1e-5)
    assert stage == pytest.approx(float(part), rel=1e-5)
    assert stage < start


def test_coarse_to_fine_needs_a_model_with_scales(onoff, target):
    with pytest.raises(InputError, match="scales attribute"):
        synthesize_metamer(
            onoff, target, [0], Rows(), max_iter=2, coarse_to_fine=CoarseToFine()
        )
    with pytest.raises(ValueError, match="together or separate"):
        CoarseToFine(mode="sideways")


# ---------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------

CONFIG = {
    "images": {
        "tex": {"source": "plenoptic:reptile_skin", "size": [64, 64]},
        "other": {"source": "plenoptic:curie", "size": [64, 64]},
        "small": {"source": "plenoptic:curie", "size": [32, 32]},
    },
    "models": {
        "ps": {"target": "plenoptic.models.PortillaSimoncelli", "n_scales": 2},
        "onoff": {"target": "plenoptic.models.OnOff", "kernel_size": 7},
    },
    "metamer": {
        "ctf": {
            "model": "ps",
            "images": ["tex"],
            "loss": "l2",
            "coarse_to_fine": {"mode": "separate"},
            "initial": {"image": "other"},
            "optimizer": {"name": "lbfgs", "history_size": 10},
        }
    },
}


def plan(change):
    config = copy.deepcopy(CONFIG)
    change(config["metamer"]["ctf"])
    return plan_study(validate_config(config))


def test_config_fills_in_coarse_to_fine_and_reads_the_starting_image():
    study = plan(lambda group: None)
    (spec,) = study.runs.values()
    ctf = spec["settings"]["coarse_to_fine"]
    assert ctf == {"mode": "separate", "change_tol": 1e-2, "window": 50}
    assert sorted(spec["images"]) == ["other", "tex"]
    assert spec["settings"]["penalty"] == "range"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda g: g.update(model="onoff"),
            r"metamer\.ctf\.coarse_to_fine: model 'onoff' .* has no scales",
        ),
        (
            lambda g: g.update(loss="portilla_simoncelli"),
            r"metamer\.ctf\.coarse_to_fine: the portilla_simoncelli loss",
        ),
        (
            lambda g: g.update(initial={"image": "small"}),
            r"metamer\.ctf\.initial\.image: 'small' does not have the size",
        ),
        (
            lambda g: g.update(initial={"image": "nowhere"}),
            r"metamer\.ctf\.initial\.image: 'nowhere' is not defined under images",
        ),
        (
            lambda g: g["optimizer"].update(amsgrad=True),
            r"metamer\.ctf\.optimizer: amsgrad is not a setting of lbfgs",
        ),
        (
            lambda g: g.update(coarse_to_fine={"mode": "sideways"}),
            r"coarse_to_fine",
        ),
    ],
)
def test_config_refuses_metamer_settings_that_cannot_work(change, message):
    with pytest.raises(ConfigError, match=message):
        plan(change)
