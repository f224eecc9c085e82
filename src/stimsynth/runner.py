"""Running one synthesis: from a run spec and its inputs to a published run store.

:func:`execute_run` is what a synthesis job does. It picks the device, loads the
prepared images and the pinned model (or builds the metrics), runs the method while
streaming the trajectory into a partial store, adds the results and provenance,
and publishes the store at its final path.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import __version__
from .checkpoint import CHECKPOINT_EVERY, Checkpoint
from .config import spec_hash
from .devices import claim_gpu, in_gpuless_slurm_job, scheduler_gpus
from .errors import InputError
from .images import open_image, translate
from .models import build_metric, load_pinned_model
from .store import (
    FORMAT_VERSION,
    RunWriter,
    StoreError,
    cut_store,
    open_run,
    publish,
)
from .synthesis import (
    CoarseToFine,
    synthesize_eigendistortion,
    synthesize_geodesic,
    synthesize_mad,
    synthesize_metamer,
)
from .synthesis.metamer import MetamerResult

logger = logging.getLogger(__name__)

SAMPLE_DIMS = {
    "metamer": "sample",
    "mad": "direction",
    "eigendistortion": "eigenindex",
    "geodesic": None,
}
SNAPSHOTS = {
    "metamer": ("metamer_snapshot", ("channel", "y", "x")),
    "mad": ("mad_image_snapshot", ("channel", "y", "x")),
    # Power iteration keeps no snapshots, so this name is never written.
    "eigendistortion": (
        "eigendistortion_snapshot",
        ("eigenindex", "channel", "y", "x"),
    ),
    "geodesic": ("path_snapshot", ("step", "channel", "y", "x")),
}


class DeviceError(InputError):
    """The device the study asks for is not there; a setting to change, not a bug."""


def select_device(requested: str) -> torch.device:
    """The device a run uses: ``cpu``, ``cuda``, or ``auto`` (a GPU if there is one).

    A GPU is claimed for the rest of the process (:func:`stimsynth.devices.claim_gpu`),
    so that jobs sharing a machine's GPUs each get their own. With ``cuda`` a job
    waits for a GPU to come free; with ``auto`` it runs on the CPU when none is
    free, when it sees none, or when it is a SLURM job that was granted none.

    Raises
    ------
    DeviceError
        If ``cuda`` is asked for and this job has no GPU to use.
    """
    if requested == "cpu":
        return torch.device("cpu")
    granted = scheduler_gpus()
    if granted:
        # In the job log, so that a GPU that was granted but not used shows.
        logger.info(
            "GPUs assigned to this job: %s",
            ", ".join(f"{name}={value}" for name, value in granted.items()),
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if in_gpuless_slurm_job():
        reason = "this SLURM job was granted no GPU"
        count = 0
    elif count == 0 and granted:
        reason = "GPUs are assigned to this job but torch sees none (CPU-only torch?)"
    else:
        reason = "this job sees no GPU"
    if count == 0:
        if requested == "cuda":
            raise DeviceError(
                f"device: the study asks for cuda but {reason}; run it where "
                "Snakemake grants a GPU (resources gpu=1) or set device: auto"
            )
        logger.info("Running on the CPU: %s", reason)
        return torch.device("cpu")
    index = claim_gpu(count, wait=requested == "cuda")
    if index is None:
        logger.info("Running on the CPU: all %d GPUs are claimed by other jobs", count)
        return torch.device("cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def execute_run(
    spec: dict[str, Any],
    images: dict[str, str | os.PathLike],
    store: str | os.PathLike,
    partial: str | os.PathLike,
    model: str | os.PathLike | None = None,
    config_hash: str = "",
    threads: int = 1,
    checkpoint_every: int = CHECKPOINT_EVERY,
    final_checkpoint: str | os.PathLike | None = None,
    continue_from: dict[str, str] | None = None,
) -> Path:
    """Run one synthesis and publish its store.

    Parameters
    ----------
    spec
        The run spec from :func:`stimsynth.config.plan_study`.
    images
        Paths of the prepared images the run reads, by image name.
    store
        Published path of the run store.
    partial
        Where the store is written while the run goes.
    model
        Path of the pinned model, for methods that use one.
    config_hash
        Hash of the study config, recorded with the run.
    threads
        CPU threads torch may use.
    checkpoint_every
        Iterations between checkpoints, which are also the appends to the store.
        A checkpoint left by an earlier attempt at the same spec is resumed from.
    final_checkpoint
        Where to keep the state the run ends with, so that a later round can
        send it back for more iterations; None keeps none.
    continue_from
        For a run sent back for more iterations: ``store``, the published store
        of the round before, and ``checkpoint``, the final state it kept. The new
        store holds the whole trajectory, the earlier round's included.

    Returns
    -------
    path
        The published store.
    """
    torch.set_num_threads(max(1, int(threads)))
    device = select_device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    method = spec["method"]
    started = datetime.now(UTC)
    clock = time.perf_counter()
    checkpoint = Checkpoint(
        Path(partial).with_suffix(".checkpoint"),
        every=checkpoint_every,
        identity=spec_hash(spec),
        final_path=final_checkpoint,
    )
    resumed = checkpoint.load(device)
    if resumed is not None and not _resumable(Path(partial), resumed):
        checkpoint.forget()
        resumed = None
    if resumed is None and continue_from is not None:
        resumed = _continue(checkpoint, continue_from, Path(partial), device)
        checkpoint.meta = resumed["meta"]
        checkpoint.meta.setdefault("continued_at", []).append(int(resumed["iteration"]))
        logger.info(
            "Run %s continues round %d from iteration %d, on %s (%s)",
            spec["run_id"],
            spec.get("round", 0),
            resumed["iteration"],
            device,
            spec["dtype"],
        )
    elif resumed is None:
        checkpoint.meta = {"started": started.isoformat(timespec="seconds"), "at": []}
        logger.info("Run %s starts on %s (%s)", spec["run_id"], device, spec["dtype"])
    else:
        checkpoint.meta = resumed["meta"]
        checkpoint.meta["at"].append(int(resumed["iteration"]))
        logger.info(
            "Run %s resumes from its checkpoint at iteration %d, on %s (%s)",
            spec["run_id"],
            resumed["iteration"],
            device,
            spec["dtype"],
        )

    tensors = {
        name: torch.from_numpy(open_image(path).values)[None].to(device, dtype)
        for name, path in images.items()
    }
    network = None
    if model is not None:
        network, _ = load_pinned_model(model)
        network = network.to(device=device, dtype=dtype)

    sample_coords = {"seed": ("sample", [spec["seed"]])} if method == "metamer" else {}
    snapshot_name, snapshot_dims = SNAPSHOTS[method]
    writer = RunWriter(
        partial,
        sample_dim=SAMPLE_DIMS[method],
        sample_coords=sample_coords,
        snapshot_name=snapshot_name,
        snapshot_dims=snapshot_dims,
        flush_every=checkpoint_every,
        resume=resumed["store_lengths"] if resumed else None,
    )
    checkpoint.writer = writer
    final, outcome = METHOD_RUNNERS[method](spec, tensors, network, writer, checkpoint)

    wall = time.perf_counter() - clock
    attrs = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "run_id": spec["run_id"],
        "spec": spec,
        "spec_hash": spec_hash(spec),
        "config_hash": config_hash,
        "versions": versions(),
        "git_commit": git_commit(),
        "device": str(device),
        "dtype": spec["dtype"],
        "started": checkpoint.meta["started"],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        # Of the last attempt only, when the run was resumed.
        "wall_time_s": round(wall, 3),
        "resumed_at": checkpoint.meta["at"],
        "round": spec.get("round", 0),
        "continued_at": checkpoint.meta.get("continued_at", []),
        **outcome,
    }
    writer.finish(final, attrs)
    logger.info(
        "Run %s ended: %s after %d iterations in %.1f s (%s)",
        spec["run_id"],
        outcome["status"],
        outcome["iterations"],
        wall,
        outcome["stop_reason"],
    )
    published = publish(partial, store)
    checkpoint.remove()
    return published


def _continue(
    checkpoint: Checkpoint,
    earlier: dict[str, str],
    partial: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Set a run sent back for more iterations up to go on from its last round.

    The earlier round's published store is copied to the partial store, and the
    state it ended with becomes the checkpoint to go on from.

    Raises
    ------
    StoreError
        If the earlier round's store or its final state cannot be used.
    """
    previous = open_run(earlier["store"])
    identity = previous.attrs["spec_hash"]
    state = checkpoint.continue_from(earlier["checkpoint"], identity, device)
    if state is None:
        raise StoreError(
            f"cannot send {previous.attrs['run_id']} back for more iterations: the "
            f"state its last round ended with, {earlier['checkpoint']}, is missing or "
            "belongs to another spec; delete the earlier round's store "
            f"{earlier['store']} to run it again from the start"
        )
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(earlier["store"], partial)
    # Consolidated metadata goes stale as soon as the copy is appended to, and a
    # stale copy can mislead a writer: it is written anew when the run finishes.
    metadata = partial / "zarr.json"
    group = json.loads(metadata.read_text())
    group.pop("consolidated_metadata", None)
    metadata.write_text(json.dumps(group))
    if not _resumable(partial, state):
        raise StoreError(f"cannot continue from the store {earlier['store']}")
    return state


def _resumable(partial: Path, state: dict[str, Any]) -> bool:
    """Whether the partial store can be cut back to what a checkpoint counted."""
    try:
        cut_store(partial, state["store_lengths"])
    except Exception as error:  # noqa: BLE001 - any damage: start the run afresh
        logger.warning(
            "The partial store %s cannot be resumed (%s); the run starts afresh",
            partial,
            error,
        )
        return False
    return True


def _run_metamer(spec, images, model, writer, checkpoint):
    settings = spec["settings"]
    target = images[spec["image"]]
    initial = settings["initial"]
    if isinstance(initial, dict):
        initial = images[initial["image"]]
    ctf = settings.get("coarse_to_fine")
    result = synthesize_metamer(
        model,
        target,
        [spec["seed"]],
        writer,
        loss=settings["loss"],
        initial=initial,
        penalty=settings.get("penalty", "range"),
        coarse_to_fine=CoarseToFine(**ctf) if ctf else None,
        checkpoint=checkpoint,
        **_optimization_settings(settings),
    )
    opt = result.optimization
    final = metamer_dataset(result, [spec["seed"]])
    return final, _outcome(opt.run_status, opt.stop_reason[0], opt.iterations)


def metamer_dataset(result: MetamerResult, seeds: list[int]) -> xr.Dataset:
    """The final variables of a metamer run's store (without its trajectory)."""
    variables = {
        "metamer": (("sample", *_IMAGE), _np(result.metamer)),
        "initial_image": (("sample", *_IMAGE), _np(result.initial)),
        "target_image": (_IMAGE, _np(result.target[0])),
        "initial_loss": ("sample", _np(result.initial_loss)),
        "final_loss": ("sample", _np(result.final_loss)),
        "stop_iteration": ("sample", np.array(result.optimization.stop_iteration)),
    }
    if result.stages:
        # Which scale each stage optimised and when it started (-1: never).
        variables["stage_name"] = ("stage_index", _strings(result.stages))
        variables["stage_start"] = ("stage_index", np.array(result.stage_start))
    return xr.Dataset(variables, coords={"seed": ("sample", list(seeds))})


def _run_mad(spec, images, model, writer, checkpoint):
    settings = spec["settings"]
    reference = images[spec["image"]]
    metrics = {name: build_metric(entry) for name, entry in spec["metrics"].items()}
    result = synthesize_mad(
        reference,
        metrics,
        spec["seed"],
        writer,
        initial_noise=settings["initial_noise"],
        hold=settings["hold"],
        tradeoff=settings["tradeoff"],
        checkpoint=checkpoint,
        **_optimization_settings(settings),
    )
    opt = result.optimization
    coords = {
        "direction": _strings(d.label for d in result.directions),
        "optimized_name": (
            "direction",
            _strings(d.optimized for d in result.directions),
        ),
        "reference_name": (
            "direction",
            _strings(d.reference for d in result.directions),
        ),
        "extremum": ("direction", _strings(d.extremum for d in result.directions)),
    }
    final = xr.Dataset(
        {
            "mad_image": (("direction", *_IMAGE), _np(result.mad_image)),
            "initial_image": (_IMAGE, _np(result.initial[0])),
            "reference_image": (_IMAGE, _np(result.reference_image[0])),
            "tradeoff": ("direction", np.array(result.tradeoff)),
            "reference_metric_start": ("direction", _np(result.reference_target)),
            "final_optimized_metric": ("direction", _np(result.final_optimized)),
            "final_reference_metric": ("direction", _np(result.final_reference)),
            "stop_iteration": ("direction", np.array(opt.stop_iteration)),
        },
        coords=coords,
    )
    reasons = "; ".join(
        f"{d.label}: {r}"
        for d, r in zip(result.directions, opt.stop_reason, strict=True)
    )
    return final, _outcome(opt.run_status, reasons, opt.iterations)


def _run_eigendistortion(spec, images, model, writer, checkpoint):
    settings = spec["settings"]
    image = images[spec["image"]]
    result = synthesize_eigendistortion(
        model,
        image,
        spec["seed"],
        writer,
        method=settings["method"],
        k=settings["k"],
        max_iter=settings["max_iter"],
        tol=settings["tol"],
        memory_budget_mb=settings["memory_budget_mb"],
        oversampling=settings["oversampling"],
        krylov_size=settings["krylov_size"],
    )
    final = xr.Dataset(
        {
            "eigenvalue": ("eigenindex", _np(result.eigenvalues)),
            "eigendistortion": (("eigenindex", *_IMAGE), _np(result.eigendistortions)),
            "residual": ("eigenindex", _np(result.residuals)),
            "image": (_IMAGE, _np(image[0])),
        },
        coords={"eigenindex": result.eigenindex},
    )
    return final, _outcome(result.status, result.stop_reason, result.iterations)


def _run_geodesic(spec, images, model, writer, checkpoint):
    settings = spec["settings"]
    end = settings["end"]
    end_name, shift = (
        (end, [0, 0])
        if isinstance(end, str)
        else (
            end["image"],
            end.get("translate", [0, 0]),
        )
    )
    start_image = images[settings["start"]]
    end_image = translate(images[end_name], shift)
    result = synthesize_geodesic(
        model,
        start_image,
        end_image,
        spec["seed"],
        writer,
        n_steps=settings["n_steps"],
        initial=settings["initial"],
        checkpoint=checkpoint,
        **_optimization_settings(settings),
    )
    opt = result.optimization
    frames = ("step", *_IMAGE)
    final = xr.Dataset(
        {
            "path": (frames, _np(result.path)),
            "initial_path": (frames, _np(result.initial_path)),
            "step_energy": ("segment", _np(result.step_energy)),
            "fade_step_energy": ("segment", _np(result.fade_step_energy)),
            "deviation": ("step", _np(result.deviation)),
            "fade_deviation": ("step", _np(result.fade_deviation)),
            "optimality_residual": (
                "interior_step",
                _np(result.optimality_residual),
            ),
            "fade_optimality_residual": (
                "interior_step",
                _np(result.fade_optimality_residual),
            ),
            "final_path_energy": result.path_energy,
            "fade_path_energy": result.fade_energy,
            "final_path_length": result.path_length,
            "fade_path_length": result.fade_length,
        },
        # Interior frames are the path's steps 1 to n_steps - 1.
        coords={"interior_step": np.arange(1, result.path.shape[0] - 1)},
    )
    return final, _outcome(opt.run_status, opt.stop_reason[0], opt.iterations)


METHOD_RUNNERS = {
    "metamer": _run_metamer,
    "mad": _run_mad,
    "eigendistortion": _run_eigendistortion,
    "geodesic": _run_geodesic,
}

_IMAGE = ("channel", "y", "x")


def _optimization_settings(settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_iter", "optimizer", "penalty_lambda", "stop", "snapshot_every")
    return {key: settings[key] for key in keys}


def _outcome(status: str, reason: str, iterations: int) -> dict[str, Any]:
    return {"status": status, "stop_reason": reason, "iterations": int(iterations)}


def _strings(values) -> np.ndarray:
    """Labels as variable-length strings, which Zarr 3 stores without a warning."""
    return np.array(list(values), dtype=object)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def versions() -> dict[str, str]:
    """Versions of the software that shapes a run's results."""
    import plenoptic
    import zarr

    return {
        "stimsynth": __version__,
        "torch": torch.__version__,
        "plenoptic": plenoptic.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "xarray": xr.__version__,
        "zarr": zarr.__version__,
    }


def git_commit() -> str:
    """The commit of the source tree stimsynth runs from, or '' when unknown.

    A tree with uncommitted changes gets ``-dirty`` appended.
    """
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit
