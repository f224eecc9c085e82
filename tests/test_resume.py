"""Runs killed with SIGKILL resume from their checkpoint and end as if never stopped.

Each scenario runs a small study through snakemake, kills the metamer and MAD
jobs at one point (in the middle of an append to the store, in the middle of a
checkpoint, or from outside at a moment the test does not choose), runs
snakemake again, and compares the stores with those of a study that was never
interrupted: every variable must be bitwise equal.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from helpers.workflow import snakemake_command, snakemake_env
from stimsynth.checkpoint import FAULT_VARIABLE, Checkpoint
from stimsynth.store import RunWriter, cut_store, open_run

STUDY = {
    "checkpoint_every": 16,
    "images": {"einstein": {"source": "plenoptic:einstein", "size": [32, 32]}},
    "models": {
        "onoff": {"target": "plenoptic.models.OnOff", "kernel_size": 31},
    },
    "metrics": {
        "mse": {"target": "plenoptic.metric.mse"},
        "ssim": {"target": "plenoptic.metric.ssim", "as_distance": True},
    },
    "metamer": {
        "front": {
            "model": "onoff",
            "images": ["einstein"],
            "max_iter": 100,
            "snapshot_every": 10,
            # A scheduler, so that its state has to survive the restart too.
            "optimizer": {"name": "adam", "scheduler": {"name": "plateau"}},
            "stop": {"window": 1000},
        }
    },
    "mad": {
        "pair": {
            "metrics": ["mse", "ssim"],
            "images": ["einstein"],
            "max_iter": 70,
            "snapshot_every": 10,
        }
    },
}
STORES = ["metamer/front/einstein/seed0.zarr", "mad/pair/einstein/seed0.zarr"]


def snakemake(
    workdir: Path,
    env: dict[str, str] | None = None,
    wait: bool = True,
    extra: tuple[str, ...] | list[str] = (),
):
    command = snakemake_command(
        workdir,
        "--rerun-incomplete",
        # The stores only: the audit and figures have nothing to do with resuming.
        *(f"results/runs/{store}" for store in STORES),
        *extra,
        cores=1,
    )
    environment = snakemake_env(env)
    if not wait:
        return subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )
    return subprocess.run(command, capture_output=True, text=True, env=environment)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    (workdir / "study.yaml").write_text(yaml.safe_dump(STUDY))
    done = snakemake(workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def fresh_copy(reference: Path, target: Path) -> Path:
    """The reference study without its run stores and what follows from them."""
    shutil.copytree(reference, target, symlinks=True)
    for store in STORES:
        shutil.rmtree(target / "results" / "runs" / store)
    return target


def assert_same_runs(resumed: Path, reference: Path) -> None:
    for store in STORES:
        ours = open_run(resumed / "results" / "runs" / store)
        theirs = open_run(reference / "results" / "runs" / store)
        assert set(ours.variables) == set(theirs.variables)
        for name in theirs.variables:
            assert np.array_equal(
                ours[name].values, theirs[name].values, equal_nan=True
            ), f"{store}: {name} differs after resuming"
        assert ours.attrs["status"] == theirs.attrs["status"]
        assert ours.attrs["iterations"] == theirs.attrs["iterations"]
        assert ours.attrs["resumed_at"] != "[]", f"{store} did not resume"
        assert theirs.attrs["resumed_at"] == "[]"
        iterations = ours["iteration"].values
        assert np.array_equal(iterations, np.arange(len(iterations)))


def test_run_killed_inside_writes_resumes_exactly(uninterrupted, tmp_path):
    workdir = fresh_copy(uninterrupted, tmp_path / "study")
    partial = workdir / "results" / ".partial"
    # First between the scalars and the snapshots of the third append, then,
    # in the resumed attempt, with its second checkpoint written to its
    # temporary file but not yet moved into place.
    for kill_at in ("flush:3", "checkpoint:2"):
        killed = snakemake(workdir, {FAULT_VARIABLE: kill_at})
        assert killed.returncode != 0, f"{kill_at} should have killed the jobs"
        assert len(list(partial.rglob("*.checkpoint"))) == len(STORES)
        assert not (workdir / "results" / "runs" / STORES[0]).exists()

    again = snakemake(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    logs = "".join(p.read_text() for p in (workdir / "results" / "logs").rglob("*.log"))
    assert "resumes from its checkpoint" in logs
    assert_same_runs(workdir, uninterrupted)
    metamer = open_run(workdir / "results" / "runs" / STORES[0])
    # Resumed twice: from the checkpoint before the third append (32) and
    # first checkpoint of the second attempt (48).
    assert metamer.attrs["resumed_at"] == "[32, 48]"
    # Nothing of the attempts is left behind.
    assert not list(partial.rglob("*.checkpoint"))


def test_run_killed_from_outside_resumes_exactly(uninterrupted, tmp_path):
    workdir = fresh_copy(uninterrupted, tmp_path / "study")
    partial = workdir / "results" / ".partial"
    # Kill the whole snakemake session, jobs included, twice, once a checkpoint
    # exists: wherever the jobs happen to be then.
    for round_ in range(2):
        process = snakemake(workdir, wait=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            checkpoints = list(partial.rglob("*.checkpoint"))
            if checkpoints and process.poll() is None:
                time.sleep(0.3 + 0.4 * round_)
                break
            if process.poll() is not None:
                break
            time.sleep(0.05)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # A killed snakemake leaves its lock, as after a node failure.
        unlocked = snakemake(workdir, extra=["--unlock"])
        assert unlocked.returncode == 0, unlocked.stderr[-2000:]
    again = snakemake(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    for store in STORES:
        ours = open_run(workdir / "results" / "runs" / store)
        theirs = open_run(uninterrupted / "results" / "runs" / store)
        for name in theirs.variables:
            assert np.array_equal(
                ours[name].values, theirs[name].values, equal_nan=True
            ), f"{store}: {name} differs after resuming"


def test_checkpoint_of_another_spec_or_unreadable_is_not_resumed(tmp_path):
    path = tmp_path / "run.checkpoint"
    Checkpoint(path, every=4, identity="spec-a").save({"iteration": 4})
    assert Checkpoint(path, identity="spec-a").load()["iteration"] == 4
    assert Checkpoint(path, identity="spec-b").load() is None
    path.write_bytes(b"not a checkpoint")
    assert Checkpoint(path, identity="spec-a").load() is None


def test_cut_store_restores_the_lengths_a_checkpoint_counted(tmp_path):
    path = tmp_path / "partial.zarr"
    writer = RunWriter(path, sample_dim="sample", flush_every=4)
    for i in range(10):
        if i % 3 == 0:
            writer.snapshot(i, np.full((1, 1, 2, 2), i, dtype=np.float32))
        writer.record(i, {"objective": np.array([float(i)])})
    writer.flush()
    assert writer.lengths() == {"iteration": 10, "snapshot": 4}
    cut_store(path, {"iteration": 8, "snapshot": 0})
    cut = xr.open_zarr(path, consolidated=False)
    assert cut["objective"].values.ravel().tolist() == list(range(8))
    assert "snapshot_image" not in cut

    # A writer resuming there appends after what was kept.
    again = RunWriter(
        path, sample_dim="sample", flush_every=4, resume={"iteration": 8, "snapshot": 0}
    )
    for i in range(8, 12):
        if i % 3 == 0:
            again.snapshot(i, np.full((1, 1, 2, 2), i, dtype=np.float32))
        again.record(i, {"objective": np.array([float(i)])})
    again.flush()
    resumed = xr.open_zarr(path, consolidated=False)
    assert resumed["objective"].values.ravel().tolist() == list(range(12))
    assert resumed["iteration"].values.tolist() == list(range(12))
    assert resumed["snapshot_iteration"].values.tolist() == [9]
