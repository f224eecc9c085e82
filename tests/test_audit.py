"""Tests of the convergence audit and the ``stimsynth`` command.

Each test copies the sample run stores (short, 60-iteration runs of every method)
into a temporary results folder, damages one store in one way, and checks that
exactly that damage flips the verdict and that the reasons name the check. The
untouched samples are not converged, so the tests audit them with thresholds
loose enough that they pass.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from zarr.errors import ZarrUserWarning

import stimsynth
from conftest import build_stores
from stimsynth.audit import (
    COLUMNS,
    audit_run,
    audit_study,
    default_thresholds,
    find_run_stores,
    resolve_thresholds,
    summarize,
    write_audit,
)
from stimsynth.cli import main
from stimsynth.config import DEFAULT_SCHEMA, ConfigError
from stimsynth.images import prepare_image, save_image
from stimsynth.store import StoreError, open_run

# Loose enough that every untouched 60-iteration sample store passes. Windows of
# 20 iterations let a 60-iteration run be judged on how it levelled off.
LENIENT = {
    "metamer": {"max_relative_loss": 0.5, "final_window": 20, "max_final_change": 0.5},
    "mad": {"max_reference_drift": 50.0, "final_window": 20, "max_final_change": 5.0},
    "eigendistortion": {"max_relative_residual": 5.0, "max_eigenvalue_change": 10.0},
    "geodesic": {"final_window": 20},
}

RUNS = {
    "metamer": "metamer/frontend/einstein/seed0",
    "texture": "metamer/texture/reptile_skin/seed0",
    "mad": "mad/mse-vs-ssim/curie/seed0",
    "eigendistortion": "eigendistortion/frontend/einstein/seed0",
    "geodesic": "geodesic/shift/einstein_small/seed0",
}

ALL_RUNS = [
    RUNS["metamer"],
    RUNS["mad"],
    RUNS["eigendistortion"],
    RUNS["geodesic"],
    "metamer/frontend/einstein/seed1",
    "metamer/texture/reptile_skin/seed0",
    "metamer/texture/reptile_skin/seed1",
]

#: Coarse-to-fine metamers over the five stages of a two-scale Portilla-Simoncelli
#: model, ten iterations a stage: one reaches the all-scales stage, one stops
#: before it.
CTF_STUDY = {
    "images": {"reptile_skin": {"source": "plenoptic:reptile_skin", "size": [32, 32]}},
    "models": {
        "texture": {"target": "plenoptic.models.PortillaSimoncelli", "n_scales": 2}
    },
    "metamer": {
        name: {
            "model": "texture",
            "images": ["reptile_skin"],
            "max_iter": max_iter,
            "coarse_to_fine": {"window": 10, "change_tol": None},
        }
        for name, max_iter in (("ctf", 80), ("ctf-short", 35))
    },
}


# --- building damaged stores ----------------------------------------------------


@pytest.fixture
def results(tmp_path: Path, sample_runs: Path) -> Path:
    """A results folder holding copies of all sample run stores under runs/."""
    folder = tmp_path / "results"
    shutil.copytree(sample_runs, folder / "runs")
    return folder


@pytest.fixture(scope="module")
def ctf_runs(tmp_path_factory) -> Path:
    """Folder of the coarse-to-fine run stores (read-only: copy them)."""
    return build_stores(tmp_path_factory.mktemp("ctf_study"), CTF_STUDY)


def store_of(results: Path, run: str) -> Path:
    return results / "runs" / f"{RUNS.get(run, run)}.zarr"


def set_attrs(store: Path, **attrs) -> None:
    """Change a store's attributes and rewrite its consolidated metadata."""
    zarr.open_group(store, mode="r+").attrs.update(attrs)
    consolidate(store)


def consolidate(store: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZarrUserWarning)
        zarr.consolidate_metadata(store)


def read(store: Path, name: str) -> np.ndarray:
    return np.array(zarr.open_array(store / name)[...])


def edit(store: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace a variable's values with ``change(values)``."""
    array = zarr.open_array(store / name, mode="r+")
    array[...] = change(np.array(array[...]))


def with_value(index, value) -> Callable[[np.ndarray], np.ndarray]:
    def change(values: np.ndarray) -> np.ndarray:
        values[index] = value
        return values

    return change


def failed_checks(row: dict) -> set[str]:
    """Names of the checks a row failed, read from its reasons."""
    failed = {
        reason.removeprefix("FAIL ").split(":")[0]
        for reason in row["reasons"].split("; ")
        if reason.startswith("FAIL ")
    }
    listed = set(row["failed_checks"].split(", ")) if row["failed_checks"] else set()
    assert listed == failed
    return failed


def thresholds(**changes: dict) -> dict:
    """LENIENT with some of its methods' thresholds changed."""
    return {
        method: LENIENT.get(method, {}) | changes.get(method, {})
        for method in {*LENIENT, *changes}
    }


# --- thresholds -----------------------------------------------------------------


def test_default_thresholds_are_the_schema_defaults():
    schema = yaml.safe_load(Path(DEFAULT_SCHEMA).read_text())
    sections = schema["$defs"]["audit"]["properties"]
    expected = {
        method: {
            name: entry["default"] for name, entry in section["properties"].items()
        }
        for method, section in sections.items()
    }
    assert default_thresholds() == expected
    assert set(expected) == {"metamer", "mad", "eigendistortion", "geodesic"}


def test_partial_thresholds_keep_the_other_defaults():
    defaults = default_thresholds()
    limits = resolve_thresholds({"metamer": {"max_relative_loss": 0.5}})
    assert limits["metamer"]["max_relative_loss"] == 0.5
    assert limits["metamer"]["max_loss"] == defaults["metamer"]["max_loss"]
    assert limits["mad"] == defaults["mad"]


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"metamer": {"max_los": 0.5}}, "max_los"),
        # Residuals are judged against each eigenpair's own eigenvalue now, under
        # a new name, so that an old limit cannot silently change its meaning.
        ({"eigendistortion": {"max_residual": 1e-3}}, "max_residual"),
        ({"eigendistortion": {"max_relative_residual": -1}}, "max_relative_residual"),
        ({"eigendistortion": {"min_sensitivity_ratio": 0.5}}, "min_sensitivity_ratio"),
        ({"geodesic": {"final_window": 0}}, "final_window"),
    ],
)
def test_unknown_or_out_of_range_threshold_is_refused_by_name(section, match):
    with pytest.raises(ConfigError, match=match):
        resolve_thresholds(section)


# --- verdicts of untouched stores -----------------------------------------------


def test_untouched_samples_pass_with_lenient_thresholds(results):
    table = audit_study(find_run_stores(results / "runs"), LENIENT)

    assert list(table.columns) == list(COLUMNS)
    assert table["run_id"].tolist() == sorted(table["run_id"])
    assert len(table) == 7
    assert (table["verdict"] == "pass").all(), table["reasons"].tolist()
    assert not table["reasons"].str.contains("FAIL").any()
    assert (table["failed_checks"] == "").all()
    # Every sample stopped at max_iter, and its reasons say so.
    assert (table["status"] == "max_iter").all()
    assert table["reasons"].str.contains("stopped at max_iter").all()


def test_rows_identify_the_run_and_its_final_objective(results):
    table = audit_study(find_run_stores(results / "runs"), LENIENT).set_index("run_id")

    metamer = table.loc[RUNS["metamer"]]
    assert (metamer["method"], metamer["group"], metamer["model"]) == (
        "metamer",
        "frontend",
        "onoff",
    )
    assert (metamer["image"], metamer["seed"], metamer["iterations"]) == (
        "einstein",
        0,
        60,
    )
    with open_run(store_of(results, "metamer")) as dataset:
        assert metamer["final_objective"] == pytest.approx(
            float(dataset.final_loss.max())
        )
        assert metamer["wall_time_s"] == dataset.attrs["wall_time_s"]
    assert metamer["store"] == str(store_of(results, "metamer"))

    mad = table.loc[RUNS["mad"]]
    assert mad["model"] == "mse vs ssim"
    with open_run(store_of(results, "mad")) as dataset:
        last = dataset.objective.isel(iteration=-1)
        assert mad["final_objective"] == pytest.approx(float(last.max()))

    eigendistortion = table.loc[RUNS["eigendistortion"]]
    with open_run(store_of(results, "eigendistortion")) as dataset:
        top = dataset.eigenvalue.sel(eigenindex=0)
        assert eigendistortion["final_objective"] == pytest.approx(float(top))

    geodesic = table.loc[RUNS["geodesic"]]
    with open_run(store_of(results, "geodesic")) as dataset:
        energy = float(dataset.final_path_energy)
        assert geodesic["final_objective"] == pytest.approx(energy)


def test_measures_hold_the_number_each_check_judged(results):
    store = store_of(results, "metamer")
    with open_run(store) as dataset:
        ratio = float((dataset.final_loss / dataset.initial_loss).max())
        loss = float(dataset.final_loss.max())

    measures = json.loads(audit_run(store, LENIENT)["measures"])

    assert measures["relative loss"] == pytest.approx(ratio, rel=1e-3)
    assert measures["absolute loss"] == pytest.approx(loss, rel=1e-3)
    assert {"plateau", "pixel range", "stall"} <= set(measures)


def test_max_iter_run_fails_when_its_checks_fail(results):
    # With the default limits, 60 iterations are too few for the metamer loss,
    # and too few to tell whether it levelled off.
    store = store_of(results, "metamer")
    with open_run(store) as dataset:
        ratio = float((dataset.final_loss / dataset.initial_loss).max())

    row = audit_run(store)

    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"relative loss", "plateau"}
    assert (
        f"final loss is {ratio:.2e} of the initial loss (limit 0.01)"
        in (row["reasons"])
    )
    assert (
        "seed 0 ran 60 iterations, fewer than two windows of final_window=50"
        in (row["reasons"])
    )
    assert "stopped at max_iter" in row["reasons"]


def test_converged_run_says_so(results):
    store = store_of(results, "geodesic")
    set_attrs(store, status="converged")

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "pass"
    assert "status: converged" in row["reasons"]


# --- runs that must not pass ----------------------------------------------------


def test_run_at_max_iter_far_above_its_target_fails(results):
    # A texture metamer cut off at 60 iterations: its loss is still 7% of where
    # it started and still falling fast.
    store = store_of(results, "texture")
    limits = {"metamer": {"final_window": 20}}

    row = audit_run(store, limits)

    assert row["status"] == "max_iter"
    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"relative loss", "plateau"}
    assert "of its whole change over the run (limit 0.02)" in row["reasons"]


def test_loss_far_above_its_absolute_limit_fails(results):
    # A start so far off that the final loss is a small fraction of it, yet large.
    store = store_of(results, "texture")
    edit(store, "initial_loss", lambda _: np.array([1000.0], dtype=np.float32))
    edit(store, "final_loss", lambda _: np.array([0.5], dtype=np.float32))

    row = audit_run(store, LENIENT)

    assert failed_checks(row) == {"absolute loss"}
    assert "final loss is 5.00e-01 (limit 0.2)" in row["reasons"]


def test_run_still_falling_at_max_iter_fails_though_its_loss_is_low(results):
    store = store_of(results, "metamer")
    start = read(store, "objective")[0, 0]
    # Falling at the same rate to the end: a linear fall never levels off.
    edit(
        store,
        "objective",
        lambda v: np.linspace(start, start * 0.005, len(v))[:, None],
    )
    limits = {**LENIENT, "metamer": {**LENIENT["metamer"], "max_final_change": 0.02}}

    row = audit_run(store, limits)

    assert failed_checks(row) == {"plateau"}
    measures = json.loads(row["measures"])
    # A steady fall of n values makes about window / n of its change in its last
    # window: the means of the last two windows lie a window apart, and the whole
    # change runs to the middle of the last one.
    n, window = len(read(store, "objective")), LENIENT["metamer"]["final_window"]
    assert measures["plateau"] == pytest.approx(
        window / (n - (window + 1) / 2), rel=1e-2
    )


def test_run_stopped_by_the_loss_change_rule_after_a_few_percent_fails(results):
    store = store_of(results, "metamer")
    initial = read(store, "initial_loss")
    start = read(store, "objective")[0, 0]
    # The objective fell by 4% in 10 iterations and then held still, so that the
    # run's loss-change rule judged it converged.
    fall = 0.04 * np.minimum(np.arange(60) / 10, 1.0)
    edit(store, "objective", lambda _: (start * (1 - fall))[:, None])
    edit(store, "final_loss", lambda _: initial * np.float32(0.96))
    set_attrs(
        store,
        status="converged",
        stop_reason="mean objective changed by 0 between the last two windows",
    )

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"relative loss"}
    assert "final loss is 9.60e-01 of the initial loss (limit 0.5)" in row["reasons"]


def test_stalled_run_fails(results):
    store = store_of(results, "texture")
    objective = read(store, "objective")
    # The optimiser stopped moving the image after 20 iterations: the objective
    # holds still and the run calls itself converged, far from its goal.
    edit(store, "pixel_change_norm", with_value(slice(20, None), 0.0))
    edit(store, "objective", with_value(slice(20, None), objective[19]))
    set_attrs(store, status="converged")
    limits = thresholds(metamer={"max_relative_loss": 0.01})

    row = audit_run(store, limits)

    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"relative loss", "stall"}
    assert (
        "the image stopped changing before the goal was reached, its largest image "
        "change over the last 20 iterations as a fraction of the largest of the run "
        "at most 0.0001: seed 0 (0.00e+00), while its loss is still 7.10e-02 of the "
        "initial loss"
    ) in row["reasons"]

    # Once the goal is met, an image at rest is no fault.
    row = audit_run(store, LENIENT)
    assert row["verdict"] == "pass"
    assert "the image stopped changing" in row["reasons"]
    assert "once the goal was reached" in row["reasons"]


def test_stalled_mad_direction_fails(results):
    store = store_of(results, "mad")
    start = read(store, "optimized_metric")[0]
    # 'max ssim' never moved: its image froze from the first iteration.
    edit(store, "pixel_change_norm", with_value((slice(None), 3), 0.0))
    edit(store, "optimized_metric", with_value((slice(None), 3), start[3]))
    edit(store, "final_optimized_metric", with_value(3, start[3] * 0.99))

    row = audit_run(store, LENIENT)

    assert failed_checks(row) == {"optimized metric", "stall"}
    assert (
        "max ssim (0.00e+00), while its optimized metric has not moved"
        in (row["reasons"])
    )


def test_coarse_to_fine_run_that_never_reached_the_finest_scale_fails(
    ctf_runs, tmp_path
):
    store = tmp_path / "short.zarr"
    shutil.copytree(ctf_runs / "metamer/ctf-short/reptile_skin/seed0.zarr", store)
    assert read(store, "stage_start")[-1] == -1

    row = audit_run(store, thresholds(metamer={"final_window": 5}))

    assert row["verdict"] == "fail"
    assert "coarse-to-fine" in failed_checks(row)
    assert "never reached stage 'all'" in row["reasons"]
    assert (
        "(pixel_statistics at 0, residual_lowpass at 10, 1 at 20, 0 at 30, "
        in (row["reasons"])
    )


def test_coarse_to_fine_run_is_judged_in_its_all_scales_stage(ctf_runs, tmp_path):
    store = tmp_path / "ctf.zarr"
    shutil.copytree(ctf_runs / "metamer/ctf/reptile_skin/seed0.zarr", store)

    row = audit_run(store, thresholds(metamer={"final_window": 10}))

    assert "FAIL coarse-to-fine" not in row["reasons"]
    assert "reached all 5 stages" in row["reasons"]
    assert "the all-scales one for the last 40 iterations" in row["reasons"]
    assert "the objective of the all-scales stage made" in row["reasons"]

    # Its 40 all-scales iterations are too few for two windows of 25.
    row = audit_run(store, thresholds(metamer={"final_window": 25}))
    assert "plateau" in failed_checks(row)
    assert "seed 0 ran 40 iterations, fewer than two windows" in row["reasons"]


def test_coarse_to_fine_stage_record_must_agree(ctf_runs, tmp_path):
    store = tmp_path / "ctf.zarr"
    shutil.copytree(ctf_runs / "metamer/ctf/reptile_skin/seed0.zarr", store)
    edit(store, "stage", lambda stages: np.minimum(stages, 3))

    row = audit_run(store, thresholds(metamer={"final_window": 10}))

    assert failed_checks(row) >= {"coarse-to-fine"}
    assert "its per-iteration stage reached index 3 only, of 4" in row["reasons"]


# --- one defect, one failed check -----------------------------------------------

DEFECTS = {
    "diverged status": (
        "metamer",
        lambda store: set_attrs(store, status="diverged"),
        {"status"},
    ),
    "failed status": (
        "geodesic",
        lambda store: set_attrs(store, status="failed"),
        {"status"},
    ),
    "unknown status": (
        "mad",
        lambda store: set_attrs(store, status="paused"),
        {"status"},
    ),
    "NaN in the metamer": (
        "metamer",
        lambda store: edit(store, "metamer", with_value((0, 0, 5, 5), np.nan)),
        {"finite values"},
    ),
    "NaN in the metamer's objective trajectory": (
        "metamer",
        lambda store: edit(store, "objective", with_value((5, 0), np.nan)),
        {"finite values"},
    ),
    "inf in the MAD objective": (
        "mad",
        lambda store: edit(store, "objective", with_value((30, 2), np.inf)),
        {"finite values"},
    ),
    "iteration without an eigenvalue estimate": (
        "eigendistortion",
        lambda store: edit(store, "eigenvalue_trace", with_value(10, np.nan)),
        {"finite values"},
    ),
    "NaN in the geodesic path energy": (
        "geodesic",
        lambda store: edit(store, "final_path_energy", lambda _: np.nan),
        {"finite values", "energy ratio"},
    ),
    "metamer loss barely fell": (
        "metamer",
        lambda store: edit(store, "final_loss", lambda _: np.float32(2e-4)),
        {"relative loss"},
    ),
    "metamer pixel far above 1": (
        "metamer",
        lambda store: edit(store, "metamer", with_value((0, 0, 7, 7), 1.2)),
        {"pixel range"},
    ),
    "metamer pixel far below 0": (
        "metamer",
        lambda store: edit(store, "metamer", with_value((0, 0, 7, 7), -0.06)),
        {"pixel range"},
    ),
    "MAD direction missing": (
        "mad",
        # 'max ssim' relabelled as a second 'max mse'.
        lambda store: edit(store, "optimized_name", with_value(3, "mse")),
        {"directions"},
    ),
    "MAD direction mislabelled": (
        "mad",
        lambda store: edit(store, "direction", with_value(3, "min ssim")),
        {"directions"},
    ),
    "MAD minimised metric went up": (
        "mad",
        lambda store: edit(store, "final_optimized_metric", with_value(0, 0.01)),
        {"optimized metric"},
    ),
    "MAD maximised metric went down": (
        "mad",
        lambda store: edit(store, "final_optimized_metric", with_value(3, 0.1)),
        {"optimized metric"},
    ),
    "eigendistortion residual large": (
        "eigendistortion",
        lambda store: edit(store, "residual", with_value(0, 0.5)),
        {"eigenpair residual"},
    ),
    "bottom eigenvalue above the top": (
        "eigendistortion",
        lambda store: edit(store, "eigenvalue", with_value(1, 0.2)),
        {"eigenvalue order", "sensitivity ratio"},
    ),
    "eigendistortion not of unit norm": (
        "eigendistortion",
        lambda store: edit(store, "eigendistortion", lambda v: v * np.float32(1.01)),
        {"unit norm"},
    ),
    "geodesic endpoint moved": (
        "geodesic",
        lambda store: edit(store, "path", lambda v: _nudge(v, -1)),
        {"endpoints"},
    ),
    "geodesic start point moved": (
        "geodesic",
        lambda store: edit(store, "path", lambda v: _nudge(v, 0)),
        {"endpoints"},
    ),
    "geodesic longer than the fade": (
        "geodesic",
        lambda store: edit(
            store, "final_path_energy", lambda _: 1.5 * read(store, "fade_path_energy")
        ),
        {"energy ratio"},
    ),
    "geodesic far from stationary": (
        "geodesic",
        lambda store: edit(store, "optimality_residual", with_value(1, 0.5)),
        {"optimality residual"},
    ),
    "geodesic strays from the straight line": (
        "geodesic",
        lambda store: edit(store, "deviation", with_value(2, 0.4)),
        {"deviation"},
    ),
}


def _nudge(path: np.ndarray, frame: int) -> np.ndarray:
    path[frame, 0, 3, 3] += np.float32(1e-3)
    return path


@pytest.mark.parametrize("defect", DEFECTS, ids=list(DEFECTS))
def test_one_defect_fails_its_check(results, defect):
    method, damage, expected = DEFECTS[defect]
    store = store_of(results, method)
    assert audit_run(store, LENIENT)["verdict"] == "pass"

    damage(store)
    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert failed_checks(row) == expected, row["reasons"]


def test_mad_reference_drift_is_measured_against_its_start(results):
    store = store_of(results, "mad")
    limits = thresholds(mad={"max_reference_drift": 0.01})
    # Hold every reference metric at its start: no drift even at the default limit.
    start = read(store, "reference_metric_start")
    edit(store, "final_reference_metric", lambda _: start.copy())
    assert audit_run(store, limits)["verdict"] == "pass"

    edit(store, "final_reference_metric", with_value(1, start[1] * 1.005))
    assert audit_run(store, limits)["verdict"] == "pass"

    edit(store, "final_reference_metric", with_value(1, start[1] * 1.05))
    row = audit_run(store, limits)
    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"reference metric drift"}
    assert "5.00e-02 at the end" in row["reasons"]
    assert "in 'max mse' (limit 0.01)" in row["reasons"]


def test_mad_reference_drift_along_the_way_fails(results):
    store = store_of(results, "mad")
    start = read(store, "reference_metric_start")
    # The held metric strays by 30% halfway and comes back by the end.
    edit(store, "reference_metric", with_value((10, 2), start[2] * 1.3))
    row = audit_run(store, thresholds(mad={"max_reference_drift": 0.01}))
    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"reference metric drift"}
    assert "3.00e-01 along the way, in 'min ssim'" in row["reasons"]


def test_mad_run_stopped_while_its_metrics_still_move_fails(results):
    store = store_of(results, "mad")

    row = audit_run(store, thresholds(mad={"max_final_change": 0.02}))

    assert failed_checks(row) == {"plateau"}
    assert "the optimized metric made" in row["reasons"]
    assert "(worst: max mse) (limit 0.02)" in row["reasons"]


def test_mad_direction_that_converged_early_is_judged_where_it_stopped(results):
    store = store_of(results, "mad")
    metric = read(store, "optimized_metric")
    # 'min mse' converged at iteration 45 and was frozen there.
    edit(store, "stop_iteration", with_value(0, 45))
    edit(store, "optimized_metric", with_value((slice(45, None), 0), metric[44, 0]))

    row = audit_run(store, thresholds(mad={"final_window": 25}))

    assert "min mse ran 45" in row["reasons"]
    assert "max mse ran" not in row["reasons"]


def test_metamer_pixel_excess_within_the_limit_passes(results):
    store = store_of(results, "metamer")
    edit(store, "metamer", with_value((0, 0, 7, 7), 1.04))

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "pass"
    assert "pixels lie up to 4.00e-02 outside [0, 1] (limit 0.05)" in row["reasons"]


# --- eigendistortions -----------------------------------------------------------


def test_residual_is_judged_against_its_own_eigenvalue(results):
    store = store_of(results, "eigendistortion")
    top, bottom = read(store, "eigenvalue")
    limits = thresholds(eigendistortion={"max_relative_residual": 0.1})
    # Small against the top eigenvalue, large against the bottom one.
    edit(store, "residual", lambda _: np.array([1e-4, 0.2 * bottom], np.float32))
    assert 0.2 * bottom / top < 2e-3

    row = audit_run(store, limits)

    assert failed_checks(row) == {"eigenpair residual"}
    assert (
        "largest |Fv - lambda v| / lambda is 2.00e-01, for eigenindex 2303"
        in (row["reasons"])
    )

    edit(store, "residual", lambda _: np.array([1e-4, 0.05 * bottom], np.float32))
    assert audit_run(store, limits)["verdict"] == "pass"


def test_residual_of_a_zero_eigenvalue_is_judged_against_the_floor(results):
    store = store_of(results, "eigendistortion")
    top, _ = read(store, "eigenvalue")
    edit(store, "eigenvalue", with_value(1, 0.0))
    edit(store, "residual", lambda _: np.array([0.0, 1e-8 * top], np.float32))

    row = audit_run(store, thresholds(eigendistortion={"max_relative_residual": 0.1}))

    assert "FAIL eigenpair residual" not in row["reasons"]
    assert "judged against 1e-06 x the top eigenvalue" in row["reasons"]
    assert "moves inf times more" in row["reasons"]


def test_sensitivity_ratio_is_recorded_and_bounded(results):
    store = store_of(results, "eigendistortion")
    top, bottom = read(store, "eigenvalue")
    ratio = math.sqrt(top / bottom)

    row = audit_run(store, LENIENT)

    assert json.loads(row["measures"])["sensitivity ratio"] == pytest.approx(
        ratio, rel=1e-3
    )
    assert (
        f"moves {ratio:.3g} times more along the top eigendistortion"
        in (row["reasons"])
    )

    row = audit_run(
        store, thresholds(eigendistortion={"min_sensitivity_ratio": ratio + 1})
    )
    assert failed_checks(row) == {"sensitivity ratio"}


def test_eigendistortion_whose_estimate_still_moves_fails(results):
    store = store_of(results, "eigendistortion")
    trace = read(store, "eigenvalue_trace")
    ends = [int(np.flatnonzero(np.isfinite(trace[:, i]))[-1]) for i in (0, 1)]

    # Both estimates held still over their last 50 iterations: steady.
    for column, last in enumerate(ends):
        edit(
            store,
            "eigenvalue_trace",
            with_value((last - 50, column), trace[last, column]),
        )
    limits = thresholds(eigendistortion={"max_eigenvalue_change": 1e-3})
    assert audit_run(store, limits)["verdict"] == "pass"

    # The bottom estimate still falling, by 10% over its last 50 iterations.
    bottom = ends[1]
    edit(
        store, "eigenvalue_trace", with_value((bottom - 50, 1), trace[bottom, 1] * 1.1)
    )
    row = audit_run(store, limits)
    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"eigenvalues steady"}
    assert "eigenindex 2303 changed by 1.00e-01" in row["reasons"]


def test_eigenvalue_trace_of_other_methods_is_not_judged(results):
    store = store_of(results, "eigendistortion")
    spec = json.loads(zarr.open_group(store).attrs["spec"])
    spec["settings"]["method"] = "lanczos"
    set_attrs(store, spec=json.dumps(spec))

    row = audit_run(store, thresholds(eigendistortion={"max_eigenvalue_change": 1e-9}))

    assert "eigenvalues steady: not judged for method 'lanczos'" in row["reasons"]
    assert row["verdict"] == "pass"


# --- geodesics ------------------------------------------------------------------


def test_geodesic_reasons_compare_with_the_fade(results):
    store = store_of(results, "geodesic")
    residual = read(store, "optimality_residual")
    fade = read(store, "fade_optimality_residual")

    row = audit_run(store, LENIENT)

    assert (
        f"largest optimality residual is {residual.max():.3g}, at step "
        f"{int(np.argmax(residual)) + 1} (pixel fade: {fade.max():.3g}, limit 0.2)"
    ) in row["reasons"]
    assert "off the straight line in representation space" in row["reasons"]


# --- stores that cannot be read -------------------------------------------------


def test_folder_without_zarr_json_is_listed_as_damaged(tmp_path):
    runs = tmp_path / "runs"
    folder = runs / "metamer" / "g" / "img" / "seed3.zarr"
    folder.mkdir(parents=True)

    assert find_run_stores(runs) == [folder]
    row = audit_run(folder, LENIENT)

    assert row["verdict"] == "fail"
    assert row["status"] == "damaged"
    assert row["run_id"] == "metamer/g/img/seed3"
    assert failed_checks(row) == {"store"}
    assert f"FAIL store: {folder} is not a run store (no zarr.json)" in (row["reasons"])


def test_unfinished_store_is_damaged(results):
    store = store_of(results, "geodesic")
    group = zarr.open_group(store, mode="r+")
    del group.attrs["status"]
    consolidate(store)
    with pytest.raises(StoreError) as refusal:
        open_run(store)

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert row["status"] == "damaged"
    assert "never finished" in str(refusal.value)
    assert row["reasons"] == f"FAIL store: {refusal.value}".replace("; ", ", ")


def test_damaged_metadata_is_reported_in_the_store_readers_words(results):
    store = store_of(results, "mad")
    (store / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError) as refusal:
        open_run(store)

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert row["status"] == "damaged"
    assert failed_checks(row) == {"store"}
    assert row["reasons"] == f"FAIL store: {refusal.value}".replace("; ", ", ")
    assert "could not be opened" in row["reasons"]


def test_arrays_cut_short_by_an_interrupted_write_are_damaged(results):
    store = store_of(results, "metamer")
    objective = zarr.open_array(store / "objective", mode="r+")
    objective.resize((40, 1))
    consolidate(store)
    with pytest.raises(StoreError):
        open_run(store)

    row = audit_run(store, LENIENT)

    assert row["status"] == "damaged"
    assert failed_checks(row) == {"store"}
    assert str(store) in row["reasons"]


def test_unreadable_coordinate_is_damage(results):
    # xarray reads the iteration coordinate on opening a store, so a store whose
    # coordinate cannot be read cannot be opened at all.
    store = store_of(results, "mad")
    for chunk in (store / "iteration").rglob("*"):
        if chunk.is_file() and chunk.name != "zarr.json":
            chunk.write_bytes(b"not a chunk")
    with pytest.raises(StoreError):
        open_run(store)

    row = audit_run(store, LENIENT)

    assert row["status"] == "damaged"
    assert failed_checks(row) == {"store"}
    assert "'iteration'" in row["reasons"]


def test_missing_variable_is_named(results):
    store = store_of(results, "metamer")
    shutil.rmtree(store / "final_loss")
    consolidate(store)

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert row["status"] == "damaged"
    assert row["run_id"] == RUNS["metamer"]
    assert "'final_loss'" in row["reasons"]


def test_variable_the_audit_needs_but_the_store_lacks_is_named(results):
    # Stores written before the optimality residual was recorded lack it.
    store = store_of(results, "geodesic")
    shutil.rmtree(store / "optimality_residual")
    consolidate(store)

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert row["status"] == "max_iter"
    assert "optimality residual" in failed_checks(row)
    assert (
        "optimality residual: cannot be judged: the store has no variable "
        "'optimality_residual'"
    ) in row["reasons"]


def test_corrupt_chunk_fails_the_checks_that_need_it(results):
    store = store_of(results, "metamer")
    chunks = [
        path
        for path in (store / "final_loss").rglob("*")
        if path.is_file() and path.name != "zarr.json"
    ]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"not a chunk")

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert {"finite values", "relative loss", "absolute loss"} <= failed_checks(row)
    assert "cannot be judged" in row["reasons"]


def test_study_with_an_unreadable_store_still_gets_a_table(results):
    broken = results / "runs" / "metamer" / "frontend" / "einstein" / "seed9.zarr"
    broken.mkdir()

    table = audit_study(find_run_stores(results / "runs"), LENIENT)

    assert len(table) == 8
    row = table.set_index("run_id").loc["metamer/frontend/einstein/seed9"]
    assert (row["verdict"], row["status"]) == ("fail", "damaged")
    assert (table["verdict"] == "fail").sum() == 1


# --- many stores ----------------------------------------------------------------


def test_audit_of_many_copied_stores_gives_each_its_verdict(results, tmp_path):
    runs = tmp_path / "many" / "runs"
    originals = find_run_stores(results / "runs")
    expected = {}
    for copy in range(7):
        for original in originals:
            store = runs / f"copy{copy}" / original.relative_to(results / "runs")
            shutil.copytree(original, store)
            expected[store] = "pass"
    stores = sorted(expected)
    # Every seventh store damaged, each in another way.
    for number, store in enumerate(stores[::7]):
        if number % 3 == 0:
            set_attrs(store, status="diverged")
        elif number % 3 == 1:
            (store / "zarr.json").unlink()
        else:
            method = zarr.open_group(store).attrs["method"]
            name = {"metamer": "final_loss", "mad": "final_optimized_metric"}.get(
                method, "objective" if method == "geodesic" else "eigenvalue"
            )
            edit(store, name, lambda v: np.full_like(v, np.nan))
        expected[store] = "fail"
    broken = runs / "never-written.zarr"
    broken.mkdir()
    expected[broken] = "fail"

    table = audit_study(find_run_stores(runs), LENIENT)

    assert len(table) == 50
    verdicts = dict(zip(table["store"], table["verdict"], strict=True))
    assert verdicts == {str(store): verdict for store, verdict in expected.items()}


# --- finding stores, summary and files ------------------------------------------


def test_find_run_stores_lists_every_zarr_folder_and_does_not_descend(results):
    runs = results / "runs"
    (runs / "metamer" / "stray.zarr").mkdir()
    inner = store_of(results, "metamer") / "nested.zarr"
    inner.mkdir()
    (inner / "zarr.json").write_text("{}")

    stores = find_run_stores(runs)

    assert stores == sorted(
        [runs / "metamer" / "stray.zarr"]
        + [runs / f"{run_id}.zarr" for run_id in ALL_RUNS]
    )


def test_summary_counts_runs_and_lists_failures(results):
    store = store_of(results, "geodesic")
    set_attrs(store, status="diverged")
    (results / "runs" / "mad" / "lost.zarr").mkdir()
    table = audit_study(find_run_stores(results / "runs"), LENIENT)

    summary = summarize(table)

    assert summary.splitlines()[0] == "Audit of 8 runs: 6 pass, 2 fail."
    counts = {line.split()[0]: line.split()[1:] for line in summary.splitlines()[2:8]}
    assert counts["metamer"] == ["4", "0"]
    assert counts["geodesic"] == ["0", "1"]
    assert counts["damaged"] == ["0", "1"]
    lines = summary.splitlines()
    assert (
        f"{RUNS['geodesic']} [diverged]: status: the run diverged (see stop_reason)"
    ) in lines
    lost = results / "runs" / "mad" / "lost.zarr"
    assert (
        f"mad/lost [damaged]: store: {lost} is not a run store (no zarr.json)"
    ) in lines


def test_summary_of_a_clean_study(results):
    table = audit_study(find_run_stores(results / "runs"), LENIENT)
    assert summarize(table).endswith("Every run passed.")


def test_write_audit_writes_table_and_summary(results, tmp_path):
    table = audit_study(find_run_stores(results / "runs"), LENIENT)
    csv, text = tmp_path / "out" / "audit.csv", tmp_path / "out" / "audit.txt"

    write_audit(table, csv, text)

    back = pd.read_csv(csv)
    assert back["run_id"].tolist() == table["run_id"].tolist()
    assert back["verdict"].tolist() == ["pass"] * 7
    assert back["measures"].map(json.loads).tolist() == [
        json.loads(m) for m in table["measures"]
    ]
    assert text.read_text() == summarize(table) + "\n"


# --- the command ----------------------------------------------------------------


@pytest.fixture
def lenient_config(tmp_path: Path) -> Path:
    config = {
        "images": {"a": {"source": "plenoptic:einstein", "size": [8, 8]}},
        "audit": LENIENT,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_audit_passes_with_config_thresholds(results, lenient_config, capsys):
    code = main(["audit", str(results), "--config", str(lenient_config)])

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("Audit of 7 runs: 7 pass, 0 fail.")


def test_cli_audit_fails_with_default_thresholds(results, capsys):
    csv = results / "audit.csv"

    code = main(["audit", str(results), "--csv", str(csv)])

    out = capsys.readouterr().out
    assert code == 1
    assert "Failed runs:" in out
    assert f"{RUNS['metamer']} [max_iter]: relative loss" in out
    assert f"{RUNS['geodesic']} [" not in out
    assert len(pd.read_csv(csv)) == 7


def test_cli_audit_fails_for_a_damaged_store(results, lenient_config, capsys):
    (store_of(results, "mad") / "zarr.json").unlink()

    code = main(["audit", str(results), "--config", str(lenient_config)])

    out = capsys.readouterr().out
    assert code == 1
    assert f"{RUNS['mad']} [damaged]: store: {store_of(results, 'mad')} is not" in out


def test_cli_audit_without_stores_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty" / "runs").mkdir(parents=True)

    code = main(["audit", str(tmp_path / "empty")])

    err = capsys.readouterr().err
    assert code == 2
    assert f"no run stores found in {tmp_path / 'empty' / 'runs'}" in err


def test_cli_audit_with_a_bad_config_is_a_usage_error(results, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"images": {}, "audit": {"metamer": {"x": 1}}}))

    code = main(["audit", str(results), "--config", str(config)])

    assert code == 2
    assert str(config) in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [[], ["audit"], ["frobnicate"], ["audit", "x", "--bogus"]]
)
def test_cli_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: stimsynth" in capsys.readouterr().err


def test_cli_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "audit" in capsys.readouterr().out


def test_cli_inspect_describes_a_store(results, capsys):
    store = store_of(results, "mad")
    with open_run(store) as dataset:
        attrs = dataset.attrs
        final = dataset.final_reference_metric.values
        plenoptic = json.loads(attrs["versions"])["plenoptic"]

    code = main(["inspect", str(store)])

    out = capsys.readouterr().out
    assert code == 0
    for text in (
        f"run          {RUNS['mad']}",
        "status       max_iter",
        f"stop reason  {attrs['stop_reason']}",
        "iterations   60",
        f"wall time    {attrs['wall_time_s']} s",
        f"device       {attrs['device']}",
        "dtype        float32",
        f"plenoptic {plenoptic}",
        f"git commit   {attrs['git_commit']}",
        f"final_reference_metric  min mse: {final[0]:.4g}, max mse: {final[1]:.4g}",
        "mad_image               (direction, channel, y, x) float32",
    ):
        assert text in out


def test_cli_inspect_of_a_non_store_exits_1(tmp_path, capsys):
    code = main(["inspect", str(tmp_path)])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "is not a run store" in captured.err


def test_cli_inspect_of_a_prepared_image_says_so(results, capsys):
    image = results.parent / "einstein.zarr"
    save_image(
        prepare_image("einstein", {"source": "plenoptic:einstein", "size": [8, 8]}),
        image,
    )

    code = main(["inspect", str(image)])

    assert code == 1
    assert "holds a prepared image, not a run" in capsys.readouterr().err


def test_cli_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stimsynth {stimsynth.__version__}"
