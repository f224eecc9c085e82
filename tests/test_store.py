"""Tests of reading run stores: provenance checks, damage, and the study table.

The stores are real: a tiny study (two metamers and a geodesic under a 2x2
average-pooling model, 30 iterations on 16x16 images) run in this process once per
module. Each test that changes a store works on a copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from zarr.errors import ZarrUserWarning

from conftest import build_stores
from stimsynth import __version__
from stimsynth.cli import main
from stimsynth.store import (
    FORMAT_VERSION,
    DamagedStoreError,
    RunWriter,
    StoreError,
    StoreVersionWarning,
    open_run,
    publish,
    read_metadata,
    verify_run,
    version_differences,
)
from stimsynth.study import COLUMNS, open_study

TINY_STUDY = {
    "images": {"einstein": {"source": "plenoptic:einstein", "size": [16, 16]}},
    "models": {"pool": {"target": "torch.nn.AvgPool2d", "kernel_size": 2}},
    "metamer": {
        "pool": {
            "model": "pool",
            "images": ["einstein"],
            "seeds": [0, 1],
            "max_iter": 30,
            "snapshot_every": 10,
        }
    },
    "geodesic": {
        "shift": {
            "model": "pool",
            "start": "einstein",
            "end": {"image": "einstein", "translate": [0, 1]},
            "n_steps": 3,
            "max_iter": 30,
        }
    },
}

METAMER = "metamer/pool/einstein/seed0"
RUN_IDS = [
    "geodesic/shift/einstein/seed0",
    METAMER,
    "metamer/pool/einstein/seed1",
]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    """Runs folder of the tiny study (read-only: copy it)."""
    return build_stores(tmp_path_factory.mktemp("tiny_study"), TINY_STUDY)


@pytest.fixture
def results(tmp_path: Path, tiny_runs: Path) -> Path:
    """A results folder holding a copy of the tiny study's stores under runs/."""
    folder = tmp_path / "results"
    shutil.copytree(tiny_runs, folder / "runs")
    return folder


def store_of(results: Path, run_id: str = METAMER) -> Path:
    return results / "runs" / f"{run_id}.zarr"


def consolidate(store: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZarrUserWarning)
        zarr.consolidate_metadata(store)


def set_attrs(store: Path, **attrs) -> None:
    """Change a store's attributes and rewrite its consolidated metadata."""
    zarr.open_group(store, mode="r+").attrs.update(attrs)
    consolidate(store)


def set_written_version(store: Path, **versions) -> None:
    written = json.loads(zarr.open_group(store, mode="r").attrs["versions"])
    set_attrs(store, versions=json.dumps(written | versions, sort_keys=True))


# --- opening one store ----------------------------------------------------------


def test_open_run_is_lazy_and_reads_the_stored_values(results):
    store = store_of(results)
    objective = np.asarray(zarr.open_array(store / "objective")[...])

    with warnings.catch_warnings():
        # A store written by the running versions opens without a warning.
        warnings.simplefilter("error", StoreVersionWarning)
        dataset = open_run(store)

    assert not dataset["metamer_snapshot"].variable._in_memory
    assert not dataset["objective"].variable._in_memory
    np.testing.assert_array_equal(dataset["objective"].values, objective)
    assert dataset.sizes["iteration"] == 30
    assert dataset.attrs["status"] == "max_iter"
    assert dataset.attrs["format_version"] == FORMAT_VERSION
    dataset.close()


def test_store_opens_with_plain_xarray_without_stimsynth_or_torch(results):
    store = store_of(results)
    reader = f"""
import json, sys
# Any import of these fails: the store must not need them (no pickles, no code).
for name in ("stimsynth", "torch", "plenoptic", "dill", "cloudpickle"):
    sys.modules[name] = None
import xarray as xr
dataset = xr.open_zarr({str(store)!r})
print(json.dumps({{
    "variables": sorted(dataset.data_vars),
    "final_loss": dataset["final_loss"].values.tolist(),
    "objective_sum": float(dataset["objective"].sum()),
    "spec": json.loads(dataset.attrs["spec"])["run_id"],
    "versions": json.loads(dataset.attrs["versions"])["torch"],
}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", reader], capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    with open_run(store) as dataset:
        assert seen["variables"] == sorted(dataset.data_vars)
        assert seen["final_loss"] == dataset["final_loss"].values.tolist()
        assert seen["objective_sum"] == pytest.approx(float(dataset["objective"].sum()))
    assert seen["spec"] == METAMER
    assert seen["versions"] == torch.__version__


def test_metadata_values_decode_as_zarr_does(results):
    for run_id in RUN_IDS:
        metadata = read_metadata(store_of(results, run_id))
        for name in metadata.arrays:
            expected = np.asarray(zarr.open_array(metadata.path / name)[...])
            values = metadata.values(name)
            assert values.dtype == expected.dtype, name
            np.testing.assert_array_equal(values, expected, err_msg=name)
            if expected.ndim:
                np.testing.assert_array_equal(metadata.last(name), expected[-1])


def test_verify_run_reads_every_chunk(results):
    store = store_of(results)
    chunk_files = [
        path for path in store.rglob("*") if path.is_file() and path.name != "zarr.json"
    ]
    arrays = [array for _, array in zarr.open_group(store, mode="r").arrays()]

    verification = verify_run(store)

    assert verification.path == store
    assert verification.arrays == len(arrays) == 16
    assert verification.chunks == len(chunk_files)
    assert verification.nbytes == sum(int(array.nbytes) for array in arrays)


# --- versions and format --------------------------------------------------------


def test_store_of_another_torch_warns_and_says_which(results):
    store = store_of(results)
    set_written_version(store, torch="1.0.0")

    with pytest.warns(StoreVersionWarning, match="torch 1.0.0") as caught:
        open_run(store).close()

    warning = caught[0].message
    assert warning.path == store
    assert warning.differences == {"torch": ("1.0.0", torch.__version__)}
    assert str(store) in str(warning)
    with pytest.warns(StoreVersionWarning), open_run(store) as dataset:
        assert version_differences(dataset.attrs) == warning.differences


def test_store_of_an_older_format_warns(results):
    store = store_of(results)
    set_attrs(store, format_version=FORMAT_VERSION - 1)

    with pytest.warns(StoreVersionWarning, match="older than format") as caught:
        open_run(store).close()

    assert caught[0].message.differences == {
        "format_version": (str(FORMAT_VERSION - 1), str(FORMAT_VERSION))
    }


def test_store_of_a_newer_format_is_refused(results):
    store = store_of(results)
    set_attrs(store, format_version=FORMAT_VERSION + 1)

    with pytest.raises(StoreError, match=f"newer than format {FORMAT_VERSION}") as err:
        open_run(store)

    assert str(store) in str(err.value)
    assert f"read it with the stimsynth that wrote it, stimsynth {__version__}" in str(
        err.value
    )


# --- damaged stores -------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_consolidated(store: Path) -> None:
    root = json.loads((store / "zarr.json").read_text())
    del root["consolidated_metadata"]
    (store / "zarr.json").write_text(json.dumps(root))


# name: (damage, variable named, text of the reason, found without verify)
DAMAGE = {
    "truncated chunk": (
        lambda store: _truncate(store / "objective" / "c" / "1" / "0"),
        "objective",
        "chunk file c/1/0 is damaged",
        False,
    ),
    "deleted chunk": (
        lambda store: (store / "loss" / "c" / "0" / "0").unlink(),
        "loss",
        "lacks chunk file(s) c/0/0",
        False,
    ),
    "truncated store metadata": (
        lambda store: _truncate(store / "zarr.json"),
        None,
        "could not be opened as a run store: its zarr.json is not valid JSON",
        True,
    ),
    "deleted variable": (
        lambda store: shutil.rmtree(store / "metamer"),
        "metamer",
        "variable 'metamer' is missing",
        True,
    ),
    "deleted and forgotten variable": (
        lambda store: (shutil.rmtree(store / "final_loss"), consolidate(store)),
        "final_loss",
        "no variable 'final_loss', which every metamer store holds",
        True,
    ),
    "truncated variable metadata": (
        lambda store: _truncate(store / "penalty" / "zarr.json"),
        "penalty",
        "metadata of variable 'penalty' is not valid JSON",
        True,
    ),
    "no consolidated metadata": (
        _drop_consolidated,
        None,
        "lost the consolidated metadata",
        True,
    ),
    "missing attribute": (
        lambda store: (
            zarr.open_group(store, mode="r+").attrs.__delitem__("versions"),
            consolidate(store),
        ),
        None,
        "lacks the attribute(s) versions",
        True,
    ),
    "no outcome": (
        lambda store: (
            zarr.open_group(store, mode="r+").attrs.__delitem__("status"),
            consolidate(store),
        ),
        None,
        "never finished",
        True,
    ),
    "cut-short append": (
        lambda store: (
            zarr.open_array(store / "loss", mode="r+").resize((25, 1)),
            consolidate(store),
        ),
        "loss",
        "disagree on the length of dimension 'iteration'",
        True,
    ),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_reported_by_name_by_every_reader(results, kind, capsys, caplog):
    damage, variable, reason, cheap = DAMAGE[kind]
    store = store_of(results)
    damage(store)

    # The full check always finds it; opening finds it when it lies in metadata.
    with pytest.raises(DamagedStoreError) as error:
        verify_run(store)
    assert str(error.value).startswith(f"{store} is damaged: ")
    assert reason in str(error.value)
    assert error.value.variable == variable
    with pytest.raises(DamagedStoreError, match="is damaged"):
        open_run(store, verify=True)
    if cheap:
        with pytest.raises(DamagedStoreError, match="is damaged"):
            open_run(store)

    # The study lists it, with its reason, and still tabulates the others.
    with caplog.at_level(logging.WARNING, logger="stimsynth.study"):
        study = open_study(results, verify=not cheap)
    assert study.table["run_id"].tolist() == [r for r in RUN_IDS if r != METAMER]
    assert study.damaged["run_id"].tolist() == [METAMER]
    assert reason in study.damaged["reason"].iloc[0]
    assert study.damaged["path"].iloc[0] == str(store)
    assert METAMER in caplog.text and "damaged" in caplog.text

    # stimsynth inspect verifies, so it finds every kind of damage.
    assert main(["inspect", str(store)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(store) in captured.err and reason in captured.err


# --- the study table ------------------------------------------------------------


def test_study_table_summarises_every_run(results):
    study = open_study(results)

    table = study.table.set_index("run_id")
    assert list(study.table.columns) == list(COLUMNS)
    assert study.table["run_id"].tolist() == RUN_IDS
    assert study.damaged.empty
    for run_id in RUN_IDS:
        with open_run(store_of(results, run_id)) as dataset:
            attrs = dataset.attrs
            row = table.loc[run_id]
            assert row["status"] == attrs["status"]
            assert row["iterations"] == attrs["iterations"] == 30
            assert row["wall_time_s"] == attrs["wall_time_s"]
            assert row["config_hash"] == attrs["config_hash"]
            assert row["torch_version"] == torch.__version__
            assert row["version_differences"] == ""
            assert row["resumed_at"] == []
            assert row["path"] == str(store_of(results, run_id))
            if attrs["method"] == "metamer":
                expected = float(dataset["final_loss"].max())
            else:
                expected = float(dataset["final_path_energy"])
            assert row["final_objective"] == pytest.approx(expected, rel=1e-6)
    assert table.loc[
        METAMER, ["method", "group", "image", "seed", "model"]
    ].tolist() == [
        "metamer",
        "pool",
        "einstein",
        0,
        "pool",
    ]


def test_study_trajectory_is_lazy(results):
    study = open_study(results)

    trajectory = study.trajectory(METAMER)

    assert set(trajectory.data_vars) == {
        "objective",
        "loss",
        "penalty",
        "gradient_norm",
        "pixel_change_norm",
        "learning_rate",
        "metamer_snapshot",
    }
    assert not trajectory["objective"].variable._in_memory
    assert trajectory["snapshot_iteration"].values.tolist() == [0, 10, 20]
    np.testing.assert_array_equal(
        trajectory["loss"].values,
        zarr.open_array(store_of(results) / "loss", mode="r")[...],
    )
    assert trajectory.attrs["run_id"] == METAMER
    with pytest.raises(KeyError, match="no run 'metamer/pool/einstein/seed7'"):
        study.trajectory("metamer/pool/einstein/seed7")


def test_study_shows_version_differences(results):
    set_written_version(store_of(results), plenoptic="0.9")

    study = open_study(results)

    differences = study.table.set_index("run_id")["version_differences"]
    assert differences[METAMER].startswith("plenoptic 0.9 (running ")
    assert (differences.drop(METAMER) == "").all()


def test_study_reads_only_published_stores(results, tiny_runs):
    # A run still going, its copy with no outcome, and a prepared image.
    partial = results / ".partial" / "metamer" / "pool" / "einstein" / "seed5.zarr"
    shutil.copytree(store_of(results), partial)
    zarr.open_group(partial, mode="r+").attrs.__delitem__("status")
    images = results / "images" / "einstein.zarr"
    shutil.copytree(tiny_runs.parent / "images" / "einstein.zarr", images)

    for folder in (results, results / "runs"):
        study = open_study(folder)
        assert study.table["run_id"].tolist() == RUN_IDS
        assert study.damaged.empty
    # A prepared image is not a run, nor a damaged one.
    study = open_study(results / "images")
    assert study.table.empty and study.damaged.empty


def test_study_never_lists_a_run_while_it_writes(results):
    """A writer appends to a partial store in a thread, then publishes it; the
    study, read over and over meanwhile, sees the run only once it is complete."""
    run_id = "metamer/pool/einstein/seed9"
    partial = results / ".partial" / f"{run_id}.zarr"
    final = store_of(results, run_id)
    template = open_run(store_of(results))
    attrs = dict(template.attrs) | {"run_id": run_id, "iterations": 60}
    finals = template[
        ["metamer", "initial_image", "target_image", "initial_loss", "final_loss"]
    ].load()
    appended = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            writer = RunWriter(
                partial,
                sample_dim="sample",
                sample_coords={"seed": ("sample", [9])},
                snapshot_name="metamer_snapshot",
                flush_every=2,
            )
            for iteration in range(60):
                writer.record(
                    iteration,
                    {
                        name: np.array([0.5])
                        for name in (
                            "objective",
                            "loss",
                            "penalty",
                            "gradient_norm",
                            "pixel_change_norm",
                        )
                    }
                    | {"learning_rate": np.float64(0.01)},
                )
                if iteration % 10 == 0:
                    writer.snapshot(iteration, np.zeros((1, 1, 16, 16)))
                appended.set()
            writer.finish(finals, attrs)
            publish(partial, final)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    assert appended.wait(timeout=60)
    seen = []
    while True:
        writing = thread.is_alive()
        study = open_study(results)
        assert study.damaged.empty
        assert len(study.table) in (3, 4)
        seen.append(run_id in set(study.table["run_id"]))
        if not writing:
            break
    thread.join()

    assert not errors
    # Absent while it was written, present once published, never in between.
    assert seen[0] is False and seen[-1] is True
    assert seen == sorted(seen)
    row = open_study(results).table.set_index("run_id").loc[run_id]
    assert row["iterations"] == 60 and row["status"] == "max_iter"
    with open_run(final) as dataset:
        assert dataset.sizes["iteration"] == 60


# --- the command ----------------------------------------------------------------


def test_cli_study_prints_the_table_and_writes_csv(results, capsys):
    csv = results / "study.csv"

    code = main(["study", str(results), "--csv", str(csv)])

    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == f"3 runs in {results / 'runs'}, 0 damaged stores."
    header = out.splitlines()[2].split()
    assert header == [
        "run_id",
        "status",
        "iterations",
        "final_objective",
        "wall_time_s",
        "device",
        "dtype",
    ]
    assert [line.split()[0] for line in out.splitlines()[3:6]] == RUN_IDS
    back = pd.read_csv(csv)
    assert back["run_id"].tolist() == RUN_IDS
    assert list(back.columns) == list(COLUMNS)


def test_cli_study_lists_damaged_stores_and_exits_1(results, capsys):
    shutil.rmtree(store_of(results) / "loss")

    code = main(["study", str(results)])

    out = capsys.readouterr().out
    assert code == 1
    assert "2 runs in" in out and "1 damaged stores." in out
    assert f"{METAMER}: variable 'loss' is missing" in out


def test_cli_study_without_stores_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    assert main(["study", str(tmp_path)]) == 2
    assert "no run stores found" in capsys.readouterr().err


def test_cli_inspect_verifies_and_reports_other_versions(results, capsys):
    store = store_of(results)
    set_written_version(store, torch="1.0.0")

    code = main(["inspect", str(store)])

    captured = capsys.readouterr()
    assert code == 0
    assert f"differs      torch 1.0.0 (running {torch.__version__})" in captured.out
    assert "verified     every chunk read: " in captured.out
    assert "resumed at   never" in captured.out
    assert captured.err.startswith("stimsynth inspect: warning: ")
    assert "torch 1.0.0" in captured.err and str(store) in captured.err


def test_study_lists_a_store_folder_without_metadata_as_damaged(results):
    # What a store being deleted (or half copied) looks like.
    (results / "runs" / "metamer" / "pool" / "einstein" / "seed8.zarr").mkdir()

    study = open_study(results)

    assert study.table["run_id"].tolist() == RUN_IDS
    assert study.damaged["run_id"].tolist() == ["metamer/pool/einstein/seed8"]
    assert "is not a run store (no zarr.json)" in study.damaged["reason"].iloc[0]
