"""Shared fixtures: real run stores of every method, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stimsynth.config import plan_study, validate_config
from stimsynth.images import prepare_image, save_image
from stimsynth.models import build_model, pin_model
from stimsynth.runner import execute_run

#: A small study with one store per method and three more metamers: short runs that
#: stop at max_iter, as stores of unfinished syntheses look.
SAMPLE_STUDY = {
    "images": {
        "einstein": {"source": "plenoptic:einstein", "size": [48, 48]},
        "einstein_small": {"source": "plenoptic:einstein", "size": [24, 24]},
        "curie": {"source": "plenoptic:curie", "size": [48, 48]},
        "reptile_skin": {"source": "plenoptic:reptile_skin", "size": [32, 32]},
    },
    "models": {
        "texture": {"target": "plenoptic.models.PortillaSimoncelli", "n_scales": 2},
        "onoff": {
            "target": "plenoptic.models.OnOff",
            "kernel_size": 31,
            "pretrained": True,
        },
        "onoff_small": {
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
        "texture": {
            "model": "texture",
            "images": ["reptile_skin"],
            "seeds": [0, 1],
            "max_iter": 60,
        },
        "frontend": {
            "model": "onoff",
            "images": ["einstein"],
            "seeds": [0, 1],
            "max_iter": 60,
            "optimizer": {"name": "adam", "lr": 0.05},
        },
    },
    "mad": {
        "mse-vs-ssim": {
            "metrics": ["mse", "ssim"],
            "images": ["curie"],
            "max_iter": 60,
        }
    },
    "eigendistortion": {
        "frontend": {"model": "onoff", "images": ["einstein"], "max_iter": 60}
    },
    "geodesic": {
        "shift": {
            "model": "onoff_small",
            "start": "einstein_small",
            "end": {"image": "einstein_small", "translate": [0, 2]},
            "n_steps": 4,
            "max_iter": 60,
        }
    },
}


def build_stores(root: Path, study_config: dict) -> Path:
    """Run a whole study in this process, without Snakemake; return its runs folder.

    Parameters
    ----------
    root
        Folder that receives images, models and run stores.
    study_config
        A config, validated here.

    Returns
    -------
    runs
        The folder holding one store per run id.
    """
    config = validate_config(study_config)
    study = plan_study(config)
    images = {}
    for name, entry in config["images"].items():
        images[name] = root / "images" / f"{name}.zarr"
        save_image(prepare_image(name, entry), images[name])
    (root / "models").mkdir()
    for name, entry in config["models"].items():
        if name not in study.model_shapes:
            continue
        model = build_model(entry, tuple(study.model_shapes[name]))
        spec = {"name": name, "model": entry, "image_shape": study.model_shapes[name]}
        pin_model(model, spec, root / "models" / f"{name}.pt")
    for run_id, spec in study.runs.items():
        model = spec["settings"].get("model")
        execute_run(
            spec,
            {name: images[name] for name in spec["images"]},
            store=root / "runs" / f"{run_id}.zarr",
            partial=root / ".partial" / f"{run_id}.zarr",
            model=root / "models" / f"{model}.pt" if model else None,
            config_hash=study.config_hash,
            threads=torch.get_num_threads(),
            checkpoint_every=25,
        )
    return root / "runs"


@pytest.fixture(scope="session")
def sample_runs(tmp_path_factory) -> Path:
    """Folder of real run stores of every method, by run id (read-only: copy it)."""
    return build_stores(tmp_path_factory.mktemp("sample_study"), SAMPLE_STUDY)
