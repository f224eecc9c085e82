"""The whole study through snakemake, on a tiny config: every run ends in a store."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from helpers.workflow import run_snakemake
from stimsynth.config import load_config, plan_study
from stimsynth.store import open_run, run_spec

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

TINY = {
    "images": {
        "einstein": {"source": "plenoptic:einstein", "size": [32, 32]},
        "curie": {"source": "plenoptic:curie", "size": [32, 32]},
        "skin": {"source": "plenoptic:reptile_skin", "size": [32, 32], "fit": "crop"},
    },
    "models": {
        "texture": {"target": "plenoptic.models.PortillaSimoncelli", "n_scales": 2},
        "onoff": {
            "target": "plenoptic.models.OnOff",
            "kernel_size": 31,
            "pretrained": True,
        },
    },
    "metrics": {
        "mse": {"target": "plenoptic.metric.mse"},
        "ssim": {"target": "plenoptic.metric.ssim", "as_distance": True},
    },
    "metamer": {
        "texture": {"model": "texture", "images": ["skin"], "max_iter": 20},
        "frontend": {
            "model": "onoff",
            "images": ["einstein"],
            "seeds": [0, 1],
            "max_iter": 20,
            "snapshot_every": 5,
        },
    },
    "mad": {"pair": {"metrics": ["mse", "ssim"], "images": ["curie"], "max_iter": 20}},
    "eigendistortion": {
        "frontend": {"model": "onoff", "images": ["einstein"], "max_iter": 20}
    },
    "geodesic": {
        "shift": {
            "model": "onoff",
            "start": "einstein",
            "end": {"image": "einstein", "translate": [0, 2]},
            "n_steps": 4,
            "max_iter": 20,
        }
    },
}


def snakemake(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, *args, env=env)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    (workdir / "study.yaml").write_text(yaml.safe_dump(TINY))
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


def test_every_run_publishes_a_store_with_its_trajectory(study):
    runs = plan_study(load_config(study / "study.yaml")).runs
    assert len(runs) == 6
    for run_id, spec in runs.items():
        store = open_run(study / "results" / "runs" / f"{run_id}.zarr")
        assert store.attrs["run_id"] == run_id
        assert run_spec(store) == spec
        assert store.attrs["status"] in ("converged", "max_iter")
        assert store.attrs["device"] == "cpu"
        assert len(store.attrs["spec_hash"]) == 64
        assert 0 < store.attrs["iterations"] <= 40
        if spec["method"] != "eigendistortion":
            objective = store["objective"].values
            assert objective.shape[0] == store.attrs["iterations"]
            assert np.isfinite(objective).all()
    # nothing is left behind as a partial store
    assert not list((study / "results" / ".partial").rglob("zarr.json"))


def test_metamer_store_holds_snapshots_and_the_target(study):
    store = open_run(study / "results/runs/metamer/frontend/einstein/seed1.zarr")
    assert list(store["snapshot_iteration"].values) == [0, 5, 10, 15]
    assert store["metamer_snapshot"].shape == (4, 1, 1, 32, 32)
    with xr.open_zarr(study / "results/images/einstein.zarr") as ds:
        np.testing.assert_array_equal(store["target_image"].values, ds["image"].values)
    assert int(store["seed"].values[0]) == 1
    assert float(store["final_loss"][0]) < float(store["initial_loss"][0])


def test_audit_table_and_figures_cover_every_run(study):
    table = pd.read_csv(study / "results" / "audit.csv")
    runs = plan_study(load_config(study / "study.yaml")).runs
    assert sorted(table["run_id"]) == sorted(runs)
    assert set(table["verdict"]) <= {"pass", "fail"}
    assert table["reasons"].str.len().min() > 0
    summary = (study / "results" / "audit.txt").read_text()
    assert "metamer" in summary
    for run_id in runs:
        png = study / "results" / "figures" / "runs" / f"{run_id}.png"
        assert png.stat().st_size > 10_000
    assert (study / "results" / "figures" / "study.png").stat().st_size > 10_000


def test_a_second_run_has_nothing_to_do(study):
    result = snakemake(study, "--dry-run", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_one_group_reruns_only_its_runs(study, tmp_path):
    config = yaml.safe_load((study / "study.yaml").read_text())
    config["metamer"]["frontend"]["max_iter"] = 25
    copy = tmp_path / "study"
    shutil.copytree(study, copy, symlinks=True)
    (copy / "study.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(copy, "--dry-run", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "synthesize_metamer" in output
    for untouched in ("synthesize_mad", "synthesize_geodesic", "prepare_model"):
        assert untouched not in output


def test_a_config_naming_an_unknown_model_stops_before_any_job(tmp_path):
    config = {
        "images": TINY["images"],
        "metamer": {"bad": {"model": "missing", "images": ["einstein"]}},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "metamer.bad.model: 'missing' is not defined under models" in output
    assert not (tmp_path / "results").exists()


def job_counts(output: str) -> dict[str, int]:
    """Rule name -> number of jobs, from the table a dry run prints."""
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def test_adding_an_image_runs_only_the_new_runs(study, tmp_path):
    config = yaml.safe_load((study / "study.yaml").read_text())
    config["metamer"]["frontend"]["images"].append("curie")
    copy = tmp_path / "study"
    shutil.copytree(study, copy, symlinks=True)
    (copy / "study.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(copy, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout + result.stderr)
    # Two seeds on the new image; the model is checked on it, not pinned again.
    assert counts["synthesize_metamer"] == 2
    assert counts["check_model"] == 1
    assert "pin_model" not in counts
    assert "synthesize_geodesic" not in counts


def test_a_missing_image_file_stops_the_study_with_its_entry_and_no_traceback(
    tmp_path,
):
    config = {
        "images": {"mine": {"source": "photos/missing.png", "size": [32, 32]}},
        "models": {"onoff": TINY["models"]["onoff"]},
        "metamer": {"front": {"model": "onoff", "images": ["mine"], "max_iter": 5}},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "images.mine.source: image file 'photos/missing.png' does not exist" in output
    )
    assert "Traceback" not in output
    assert not (tmp_path / "results" / "runs").exists()


def test_a_diverged_run_is_published_and_the_study_goes_on(tmp_path):
    study = {
        "images": {"einstein": {"source": "plenoptic:einstein", "size": [32, 32]}},
        "models": {"onoff": TINY["models"]["onoff"]},
        "metamer": {
            "nan": {
                "model": "onoff",
                "images": ["einstein"],
                "max_iter": 60,
                "loss": "tests.helpers.bad_models:loss_that_turns_nan",
            },
            "fine": {"model": "onoff", "images": ["einstein"], "max_iter": 20},
        },
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    done = snakemake(tmp_path, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "results" / "runs" / "metamer"
    diverged = open_run(runs / "nan" / "einstein" / "seed0.zarr")
    assert diverged.attrs["status"] == "diverged"
    # The loss turns NaN on its 31st call in the job: iterations 0 to 29 took one
    # each, so iteration 30 is the first whose objective is NaN.
    assert "objective became nan at iteration 30" in diverged.attrs["stop_reason"]
    assert diverged.sizes["iteration"] == 31
    assert np.isfinite(diverged["metamer"].values).all()
    fine = open_run(runs / "fine" / "einstein" / "seed0.zarr")
    assert fine.attrs["status"] == "max_iter"
    table = pd.read_csv(tmp_path / "results" / "audit.csv").set_index("run_id")
    row = table.loc["metamer/nan/einstein/seed0"]
    assert row["verdict"] == "fail"
    assert "diverged" in row["reasons"]
    assert (tmp_path / "results" / "figures" / "study.png").is_file()
