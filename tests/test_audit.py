"""Tests of the convergence audit and the ``stimsynth`` command.

Each test copies the sample run stores (short, 60-iteration runs of every method)
into a temporary results folder, damages one store in one way, and checks that
exactly that damage flips the verdict and that the reasons name the check. The
untouched samples are not converged, so the tests audit them with thresholds
loose enough that they pass.
"""

from __future__ import annotations

import json
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
from stimsynth.store import open_run

# Loose enough that every untouched 60-iteration sample store passes.
LENIENT = {
    "metamer": {"max_relative_loss": 0.5},
    "mad": {"max_reference_drift": 50.0},
    "eigendistortion": {"max_residual": 0.05, "max_eigenvalue_change": 10.0},
}

RUNS = {
    "metamer": "metamer/frontend/einstein/seed0",
    "mad": "mad/mse-vs-ssim/curie/seed0",
    "eigendistortion": "eigendistortion/frontend/einstein/seed0",
    "geodesic": "geodesic/shift/einstein_small/seed0",
}

ALL_RUNS = [
    *RUNS.values(),
    "metamer/frontend/einstein/seed1",
    "metamer/texture/reptile_skin/seed0",
    "metamer/texture/reptile_skin/seed1",
]


# --- building damaged stores ----------------------------------------------------


@pytest.fixture
def results(tmp_path: Path, sample_runs: Path) -> Path:
    """A results folder holding copies of all sample run stores under runs/."""
    folder = tmp_path / "results"
    shutil.copytree(sample_runs, folder / "runs")
    return folder


def store_of(results: Path, method: str) -> Path:
    return results / "runs" / f"{RUNS[method]}.zarr"


def set_attrs(store: Path, **attrs) -> None:
    """Change a store's attributes and rewrite its consolidated metadata."""
    zarr.open_group(store, mode="r+").attrs.update(attrs)
    consolidate(store)


def consolidate(store: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZarrUserWarning)
        zarr.consolidate_metadata(store)


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
    """Names of the checks a row failed."""
    return {
        reason.removeprefix("FAIL ").split(":")[0]
        for reason in row["reasons"].split("; ")
        if reason.startswith("FAIL ")
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


def test_partial_thresholds_keep_the_other_defaults():
    defaults = default_thresholds()
    limits = resolve_thresholds({"metamer": {"max_relative_loss": 0.5}})
    assert limits["metamer"]["max_relative_loss"] == 0.5
    assert (
        limits["metamer"]["max_range_excess"]
        == (defaults["metamer"]["max_range_excess"])
    )
    assert limits["mad"] == defaults["mad"]


def test_unknown_threshold_is_refused_by_name():
    with pytest.raises(ConfigError, match="max_loss"):
        resolve_thresholds({"metamer": {"max_loss": 0.5}})
    with pytest.raises(ConfigError, match="max_residual"):
        resolve_thresholds({"eigendistortion": {"max_residual": -1}})


# --- verdicts of untouched stores -----------------------------------------------


def test_untouched_samples_pass_with_lenient_thresholds(results):
    table = audit_study(find_run_stores(results / "runs"), LENIENT)

    assert list(table.columns) == list(COLUMNS)
    assert table["run_id"].tolist() == sorted(table["run_id"])
    assert len(table) == 7
    assert (table["verdict"] == "pass").all(), table["reasons"].tolist()
    assert not table["reasons"].str.contains("FAIL").any()
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


def test_max_iter_run_fails_when_its_checks_fail(results):
    # With the default limits, 60 iterations are too few for the metamer loss.
    store = store_of(results, "metamer")
    with open_run(store) as dataset:
        ratio = float((dataset.final_loss / dataset.initial_loss).max())

    row = audit_run(store)

    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"relative loss"}
    assert (
        f"final loss is {ratio:.2e} of the initial loss (limit 0.01)"
        in (row["reasons"])
    )
    assert "stopped at max_iter" in row["reasons"]


def test_converged_run_says_so(results):
    store = store_of(results, "geodesic")
    set_attrs(store, status="converged")

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "pass"
    assert "status: converged" in row["reasons"]


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
        lambda store: edit(store, "residual", with_value(1, 0.01)),
        {"eigenpair residual"},
    ),
    "bottom eigenvalue above the top": (
        "eigendistortion",
        lambda store: edit(store, "eigenvalue", with_value(1, 0.2)),
        {"eigenvalue order"},
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
        lambda store: edit(store, "final_path_energy", lambda _: 1.5 * 2.067784),
        {"energy ratio"},
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
    # Hold every reference metric at its start: no drift even at the default limit.
    start = np.array(zarr.open_array(store / "reference_metric_start")[...])
    edit(store, "final_reference_metric", lambda _: start.copy())
    assert audit_run(store)["verdict"] == "pass"

    edit(store, "final_reference_metric", with_value(1, start[1] * 1.005))
    assert audit_run(store)["verdict"] == "pass"

    edit(store, "final_reference_metric", with_value(1, start[1] * 1.05))
    row = audit_run(store)
    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"reference metric drift"}
    assert "5.00e-02 at the end" in row["reasons"]
    assert "in 'max mse' (limit 0.01)" in row["reasons"]


def test_mad_reference_drift_along_the_way_fails(results):
    store = store_of(results, "mad")
    start = np.array(zarr.open_array(store / "reference_metric_start")[...])
    # The held metric strays by 30% halfway and comes back by the end.
    edit(store, "reference_metric", with_value((10, 2), start[2] * 1.3))
    row = audit_run(store, LENIENT | {"mad": {"max_reference_drift": 0.01}})
    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"reference metric drift"}
    assert "3.00e-01 along the way, in 'min ssim'" in row["reasons"]


def test_metamer_pixel_excess_within_the_limit_passes(results):
    store = store_of(results, "metamer")
    edit(store, "metamer", with_value((0, 0, 7, 7), 1.04))

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "pass"
    assert "pixels lie up to 4.00e-02 outside [0, 1] (limit 0.05)" in row["reasons"]


# --- stores that cannot be read -------------------------------------------------


def test_folder_without_zarr_json_fails_without_raising(tmp_path):
    folder = tmp_path / "runs" / "metamer" / "g" / "img" / "seed3.zarr"
    folder.mkdir(parents=True)

    row = audit_run(folder, LENIENT)

    assert row["verdict"] == "fail"
    assert row["run_id"] == "metamer/g/img/seed3"
    assert failed_checks(row) == {"store"}
    assert "no zarr.json" in row["reasons"]


def test_unfinished_store_fails_without_raising(results):
    store = store_of(results, "geodesic")
    group = zarr.open_group(store, mode="r+")
    del group.attrs["status"]
    consolidate(store)

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert "never finished" in row["reasons"]


def test_damaged_metadata_fails_without_raising(results):
    store = store_of(results, "mad")
    (store / "zarr.json").write_text("{not json")

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"store"}
    assert "could not be opened" in row["reasons"]


def test_missing_variable_is_named(results):
    store = store_of(results, "metamer")
    shutil.rmtree(store / "final_loss")
    consolidate(store)

    row = audit_run(store, LENIENT)

    assert row["verdict"] == "fail"
    assert row["run_id"] == RUNS["metamer"]
    assert "'final_loss'" in row["reasons"]


def test_study_with_an_unreadable_store_still_gets_a_table(results):
    broken = results / "runs" / "metamer" / "frontend" / "einstein" / "seed9.zarr"
    broken.mkdir()

    table = audit_study([*find_run_stores(results / "runs"), broken], LENIENT)

    assert len(table) == 8
    row = table.set_index("run_id").loc["metamer/frontend/einstein/seed9"]
    assert row["verdict"] == "fail"
    assert (table["verdict"] == "fail").sum() == 1


# --- finding stores, summary and files ------------------------------------------


def test_find_run_stores_skips_non_stores_and_does_not_descend(results):
    runs = results / "runs"
    (runs / "metamer" / "stray.zarr").mkdir()
    inner = store_of(results, "metamer") / "nested.zarr"
    inner.mkdir()
    (inner / "zarr.json").write_text("{}")

    stores = find_run_stores(runs)

    assert stores == sorted(runs / f"{run_id}.zarr" for run_id in ALL_RUNS)


def test_summary_counts_runs_and_lists_failures(results):
    store = store_of(results, "geodesic")
    set_attrs(store, status="diverged")
    table = audit_study(find_run_stores(results / "runs"), LENIENT)

    summary = summarize(table)

    assert summary.splitlines()[0] == "Audit of 7 runs: 6 pass, 1 fail."
    counts = {line.split()[0]: line.split()[1:] for line in summary.splitlines()[2:7]}
    assert counts["metamer"] == ["4", "0"]
    assert counts["geodesic"] == ["0", "1"]
    failed = [line for line in summary.splitlines() if line.startswith("geodesic/")]
    assert failed == [
        f"{RUNS['geodesic']} [diverged]: status: the run diverged (see stop_reason)"
    ]


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


def test_eigendistortion_whose_estimate_still_moves_fails(results):
    store = store_of(results, "eigendistortion")
    trace = np.array(zarr.open_array(store / "eigenvalue_trace")[...])
    ends = [int(np.flatnonzero(np.isfinite(trace[:, i]))[-1]) for i in (0, 1)]
    thresholds = LENIENT | {"eigendistortion": {"max_residual": 0.05}}

    # Both estimates held still over their last 50 iterations: steady.
    for column, last in enumerate(ends):
        edit(
            store,
            "eigenvalue_trace",
            with_value((last - 50, column), trace[last, column]),
        )
    assert audit_run(store, thresholds)["verdict"] == "pass"

    # The bottom estimate still falling, by 10% over its last 50 iterations.
    bottom = ends[1]
    edit(
        store, "eigenvalue_trace", with_value((bottom - 50, 1), trace[bottom, 1] * 1.1)
    )
    row = audit_run(store, thresholds)
    assert row["verdict"] == "fail"
    assert failed_checks(row) == {"eigenvalues steady"}
    assert "eigenindex 2303 changed by 1.00e-01" in row["reasons"]
