"""Runs that fail the audit are sent back for more iterations, round by round."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plenoptic as po
import torch
import yaml

from helpers.recording import Rows
from helpers.workflow import run_snakemake
from stimsynth.checkpoint import Checkpoint
from stimsynth.cli import main
from stimsynth.store import open_run
from stimsynth.synthesis.metamer import synthesize_metamer


def test_a_continued_run_takes_the_steps_of_an_unbroken_one(tmp_path):
    torch.set_num_threads(1)
    model = po.models.OnOff(31, pretrained=True, cache_filt=True).eval()
    po.remove_grad(model)
    target = po.data.einstein()[..., 96:128, 96:128].contiguous()
    settings = {
        "optimizer": {"name": "adam", "scheduler": {"name": "plateau"}},
        "stop": {"window": 5, "rel_tol": 1e-6},
    }
    whole = Rows()
    unbroken = synthesize_metamer(model, target, [0], whole, max_iter=90, **settings)

    first, later = Rows(), Rows()
    state = tmp_path / "final.pt"
    ended = Checkpoint(tmp_path / "a", every=1000, identity="a", final_path=state)
    synthesize_metamer(
        model, target, [0], first, max_iter=30, checkpoint=ended, **settings
    )
    going_on = Checkpoint(tmp_path / "b", every=1000, identity="b")
    assert going_on.continue_from(state, "a", "cpu")["iteration"] == 30
    continued = synthesize_metamer(
        model, target, [0], later, max_iter=90, checkpoint=going_on, **settings
    )
    assert torch.equal(continued.metamer, unbroken.metamer)
    assert np.array_equal(
        np.concatenate([first.column("objective"), later.column("objective")]),
        whole.column("objective"),
    )
    assert continued.optimization.status == unbroken.optimization.status


def test_failed_runs_go_on_round_by_round(tmp_path):
    study = {
        "checkpoint_every": 16,
        "escalation": {"rounds": 2, "more_iterations": 1.0},
        "images": {"einstein": {"source": "plenoptic:einstein", "size": [32, 32]}},
        "models": {"onoff": {"target": "plenoptic.models.OnOff", "kernel_size": 31}},
        "metamer": {
            # Far too few iterations from noise: the audit fails it every round.
            "short": {
                "model": "onoff",
                "images": ["einstein"],
                "max_iter": 20,
                "snapshot_every": 10,
            }
        },
        "eigendistortion": {
            "short": {
                "model": "onoff",
                "images": ["einstein"],
                "max_iter": 3,
            }
        },
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    done = run_snakemake(tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    results = tmp_path / "results"
    metamer = "metamer/short/einstein/seed0"
    eigen = "eigendistortion/short/einstein/seed0"

    # Each round sent the metamer back, never the eigendistortion.
    for round_ in (0, 1):
        sent = json.loads(
            (results / "rounds" / str(round_) / "failed.json").read_text()
        )
        assert sent == [metamer]
    assert not (results / "rounds" / "1" / "runs" / "eigendistortion").exists()

    first = open_run(results / "runs" / f"{metamer}.zarr")
    last = open_run(results / "rounds" / "2" / "runs" / f"{metamer}.zarr")
    assert last.attrs["round"] == 2
    assert last.attrs["continued_at"] == "[20, 40]"
    assert last.sizes["iteration"] == 60
    assert np.array_equal(last["iteration"].values, np.arange(60))
    assert np.array_equal(last["objective"].values[:20], first["objective"].values)
    assert last["snapshot_iteration"].values.tolist() == [0, 10, 20, 30, 40, 50]
    assert float(last["final_loss"].values[0]) < float(first["final_loss"].values[0])

    table = pd.read_csv(results / "audit.csv")
    rows = table.set_index("run_id")
    assert rows.loc[metamer, "round"] == 2
    assert rows.loc[eigen, "round"] == 0
    history = pd.read_csv(results / "audit_rounds.csv")
    assert sorted(history[history["run_id"] == metamer]["round"]) == [0, 1, 2]
    assert sorted(history["audit"].unique()) == [0, 1, 2]
    # The figure of a run shows its last round.
    assert (results / "figures" / "runs" / f"{metamer}.png").is_file()

    # The command line audits what the workflow audited: each run's last round.
    exit_code = main(["audit", str(results), "--csv", str(tmp_path / "again.csv")])
    again = pd.read_csv(tmp_path / "again.csv").set_index("run_id")
    assert exit_code == 1
    assert again.loc[metamer, "round"] == 2
    assert (again["verdict"] == rows["verdict"]).all()
