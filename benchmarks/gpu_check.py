"""Check stimsynth on a GPU machine: CUDA and CPU agree, and batched seeds pay off.

Two parts, run by ``benchmarks/gpu_check.sh`` (which also sets up the environment):

``study``
    The tiny study of ``tests/test_workflow.py`` is run twice through Snakemake,
    once with ``device: cuda`` (``--resources gpu=1``) and once with ``device: cpu``.
    Every run must publish a store saying which device it used, and the numbers
    that judge a run (final losses of metamers, final metric values of MAD images,
    eigenvalues, path energies) must agree between the two devices within
    ``--rtol``: the same 20 iterations in float32 on two devices drift apart by far
    less than that.
``throughput``
    :func:`stimsynth.synthesis.metamer.synthesize_metamer` on the pretrained OnOff
    model (128x128 Einstein) and Portilla-Simoncelli (64x64 reptile skin), with four
    seeds in one batch against four calls with one seed each, for a fixed number of
    iterations (early stopping off). Reported: seconds per iteration, the speed-up
    of batching, and how far each batched seed's final loss is from its lone run's.

Exits 1 if a check fails. ``--cpu-only`` skips everything that needs a GPU (the
CUDA study and CUDA timings), to try the script on a machine without one.

Example
-------
::

    .venv/bin/python benchmarks/gpu_check.py --out benchmarks/results/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from stimsynth.config import load_config, plan_study  # noqa: E402
from stimsynth.images import prepare_image  # noqa: E402
from stimsynth.models import build_model  # noqa: E402
from stimsynth.store import open_run  # noqa: E402
from stimsynth.synthesis.metamer import synthesize_metamer  # noqa: E402
from test_workflow import TINY  # noqa: E402

# What judges a run of each method, compared between devices.
JUDGED = {
    "metamer": ["final_loss"],
    "mad": ["final_optimized_metric", "final_reference_metric"],
    "eigendistortion": ["eigenvalue"],
    "geodesic": ["final_path_energy"],
}


class NullRecorder:
    """Takes a trajectory and keeps nothing: timings measure synthesis alone."""

    def record(self, iteration, scalars):
        pass

    def snapshot(self, iteration, image):
        pass


# The study on each device ---------------------------------------------------------


def run_study(workdir: Path, device: str, cores: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.yaml").write_text(yaml.safe_dump({**TINY, "device": device}))
    command = [
        *(sys.executable, "-m", "snakemake", "results/audit.csv"),
        *("--snakefile", str(REPO / "Snakefile")),
        *("--directory", str(workdir)),
        *("--configfile", str(workdir / "study.yaml")),
        # One GPU: Snakemake runs one synthesis job that asks for it at a time.
        *("--cores", str(cores), "--resources", "gpu=1"),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the study on {device} failed:\n{result.stderr[-5000:]}")
    print(f"study on {device}: {time.perf_counter() - started:.0f} s")


def judged_values(workdir: Path) -> dict[str, dict]:
    """Per run: its device and the values that judge it."""
    runs = plan_study(load_config(workdir / "study.yaml")).runs
    values = {}
    for run_id, spec in runs.items():
        store = open_run(workdir / "results" / "runs" / f"{run_id}.zarr")
        values[run_id] = {
            "device": store.attrs["device"],
            **{
                name: np.asarray(store[name].values, dtype=float)
                for name in JUDGED[spec["method"]]
            },
        }
    return values


def compare_devices(cuda: dict, cpu: dict, rtol: float) -> list[dict]:
    rows = []
    for run_id in sorted(cpu):
        for name, reference in cpu[run_id].items():
            if name == "device":
                continue
            other = cuda[run_id][name]
            scale = np.maximum(np.abs(reference), np.finfo(np.float32).tiny)
            worst = float(np.max(np.abs(other - reference) / scale))
            rows.append(
                {
                    "run": run_id,
                    "value": name,
                    "max_rel_diff": worst,
                    "ok": worst <= rtol,
                }
            )
    return rows


# Throughput of batched seeds ------------------------------------------------------


def throughput_case(name: str, device: torch.device, iterations: int) -> dict:
    if name == "onoff_128":
        model_spec = {
            "target": "plenoptic.models.OnOff",
            "kernel_size": 31,
            "pretrained": True,
        }
        image_entry = {"source": "plenoptic:einstein", "size": [128, 128]}
        loss = "mse"
    else:
        model_spec = {"target": "plenoptic.models.PortillaSimoncelli", "n_scales": 3}
        image_entry = {
            "source": "plenoptic:reptile_skin",
            "size": [64, 64],
            "fit": "crop",
        }
        loss = "portilla_simoncelli"
    size = tuple(image_entry["size"])
    model = build_model(model_spec, size).to(device)
    image = prepare_image(name, {"color": False, **image_entry}).values
    target = torch.from_numpy(np.asarray(image, dtype=np.float32))[None].to(device)
    # No convergence: every call runs exactly `iterations` iterations.
    settings = {
        "max_iter": iterations,
        "stop": {"abs_tol": 0.0, "rel_tol": 0.0},
        "loss": loss,
        "initial": "gray",
    }

    def timed(seeds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock = time.perf_counter()
        result = synthesize_metamer(model, target, seeds, NullRecorder(), **settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - clock, result.final_loss.detach().cpu().numpy()

    timed([0])  # warm-up: kernels, caches, allocator
    batched_s, batched_loss = timed([0, 1, 2, 3])
    single = [timed([seed]) for seed in range(4)]
    single_s = sum(seconds for seconds, _ in single)
    single_loss = np.concatenate([loss for _, loss in single])
    return {
        "case": name,
        "device": str(device),
        "iterations": iterations,
        "batched_s_per_iter": batched_s / iterations,
        "single_s_per_iter": single_s / (4 * iterations),
        "speedup": single_s / batched_s,
        "max_rel_loss_diff": float(
            np.max(np.abs(batched_loss - single_loss) / np.abs(single_loss))
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU parts")
    parser.add_argument("--rtol", type=float, default=1e-2)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--cores", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__}, CUDA build {torch.version.cuda}, "
        f"GPU: {torch.cuda.get_device_name(0) if cuda else 'none'}, "
        f"CPU threads: {torch.get_num_threads()}"
    )
    if not cuda and not args.cpu_only:
        print(
            "torch sees no GPU: install a CUDA build of torch, or pass --cpu-only",
            file=sys.stderr,
        )
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    failed = False

    run_study(args.out / "study_cpu", "cpu", args.cores)
    cpu_values = judged_values(args.out / "study_cpu")
    failed |= any(values["device"] != "cpu" for values in cpu_values.values())
    if not args.cpu_only:
        run_study(args.out / "study_cuda", "cuda", args.cores)
        cuda_values = judged_values(args.out / "study_cuda")
        devices = {values["device"] for values in cuda_values.values()}
        print(f"devices of the CUDA study's runs: {sorted(devices)}")
        failed |= devices != {"cuda:0"}
        rows = compare_devices(cuda_values, cpu_values, args.rtol)
        report["study"] = rows
        print(f"\nCUDA against CPU (tolerance {args.rtol:g}, relative):")
        for row in rows:
            mark = "ok  " if row["ok"] else "FAIL"
            name = f"{row['run']} {row['value']}"
            print(f"  {mark} {name:64s} {row['max_rel_diff']:.1e}")
        failed |= not all(row["ok"] for row in rows)

    print(
        f"\nMetamers, 4 seeds in one batch against 4 single-seed calls "
        f"({args.iterations} iterations):"
    )
    report["throughput"] = []
    devices = ["cpu"] if args.cpu_only else ["cuda", "cpu"]
    for device in devices:
        for case in ("onoff_128", "portilla_simoncelli_64"):
            row = throughput_case(case, torch.device(device), args.iterations)
            report["throughput"].append(row)
            batched_ms = row["batched_s_per_iter"] * 1e3
            single_ms = row["single_s_per_iter"] * 1e3
            print(
                f"  {case:24s} {device:5s} batched {batched_ms:7.2f} ms/it,"
                f" single {single_ms:7.2f} ms/it per seed,"
                f" speed-up x{row['speedup']:.2f}, "
                f"loss diff {row['max_rel_loss_diff']:.1e}"
            )

    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    verdict = "FAILED" if failed else "passed"
    print(f"\n{verdict}; details in {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
