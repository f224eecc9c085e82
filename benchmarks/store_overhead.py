"""Time what streaming a metamer's trajectory into its run store costs.

The default study's metamer runs (``config/config.yaml``: Portilla-Simoncelli with
``n_scales: 4`` on 128x128 reptile skin, and the pretrained ``OnOff(31)`` on 128x128
Einstein, both from the ``gray`` start, with the study's optimiser, loss and
``snapshot_every``) are synthesised by two contenders in one process:

``store``
    :func:`stimsynth.synthesis.metamer.synthesize_metamer` streaming into a partial
    store through :class:`stimsynth.store.RunWriter`, with a
    :class:`stimsynth.checkpoint.Checkpoint` every ``--checkpoint-every`` iterations
    (an append to the store, then the checkpoint file), then
    :meth:`~stimsynth.store.RunWriter.finish` and :func:`stimsynth.store.publish`,
    as :func:`stimsynth.runner.execute_run` does;
``drop``
    the same call with a recorder that drops everything and no checkpoint.

Early stopping is disabled, so both run ``--iterations`` iterations. Repetitions
are interleaved, the contender that goes first alternating, and each repetition
gives a paired ratio store/drop: a shared machine's load drifts slower than one
pair of runs takes. Reported per case: the median seconds of the synthesis call
(*loop*) and of the whole run (*total*, adding finishing and publishing the
store), the median paired ratios, the fixed cost per run (store total minus store
loop), and the largest pixel difference between the two final images (zero: the
store must not change the result).

Example
-------
::

    .venv/bin/python benchmarks/store_overhead.py --reps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stimsynth.checkpoint import Checkpoint
from stimsynth.config import load_config, plan_study
from stimsynth.images import prepare_image
from stimsynth.models import build_model
from stimsynth.runner import metamer_dataset, versions
from stimsynth.store import FORMAT_VERSION, RunWriter, publish
from stimsynth.synthesis.metamer import synthesize_metamer

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("store", "drop")
#: The default study's metamer runs, by the name this benchmark gives them.
CASES = {
    "ps": "metamer/texture/reptile_skin/seed0",
    "onoff": "metamer/frontend/einstein/seed0",
}


class DropRecorder:
    """A recorder that keeps nothing: the synthesis without its store."""

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        pass

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        pass


class TimedWriter(RunWriter):
    """A run writer that adds up the wall time spent in it while the run goes."""

    spent = 0.0

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        start = time.perf_counter()
        super().record(iteration, scalars)
        self.spent += time.perf_counter() - start

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        start = time.perf_counter()
        super().snapshot(iteration, image)
        self.spent += time.perf_counter() - start


class TimedCheckpoint(Checkpoint):
    """A checkpoint that adds up the wall time of its saves (each flushes the
    writer first, then writes the checkpoint file)."""

    spent = 0.0

    def save(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().save(state, *args, **kwargs)
        self.spent += time.perf_counter() - start


def clock() -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads), in seconds."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def build_case(spec: dict[str, Any], iterations: int) -> dict[str, Any]:
    """The model, target and synthesis settings of one study run.

    Parameters
    ----------
    spec
        The run's spec, as planned from the study config.
    iterations
        Iterations to run instead of the study's ``max_iter``.

    Returns
    -------
    case
        ``model``, ``target`` and the keyword arguments of
        :func:`~stimsynth.synthesis.metamer.synthesize_metamer`.
    """
    image = prepare_image(spec["image"], spec["images"][spec["image"]])
    target = torch.from_numpy(image.values)[None]
    model = build_model(spec["model"], tuple(target.shape[-2:]))
    settings = spec["settings"]
    if not isinstance(settings["initial"], str) or settings.get("coarse_to_fine"):
        raise ValueError(f"{spec['run_id']}: a start from an image or coarse-to-fine")
    stop = dict(settings["stop"])
    # Tolerances of zero: the convergence test runs but never passes.
    stop.update(abs_tol=0.0, rel_tol=0.0)
    kwargs = {
        "max_iter": iterations,
        "optimizer": settings["optimizer"],
        "penalty_lambda": settings["penalty_lambda"],
        "stop": stop,
        "snapshot_every": settings["snapshot_every"],
        "loss": settings["loss"],
        "initial": settings["initial"],
        "penalty": settings.get("penalty", "range"),
    }
    return {
        "spec": spec,
        "model": model,
        "target": target,
        "seed": spec["seed"],
        "kwargs": kwargs,
    }


def run_store(case: dict[str, Any], store_dir: Path, every: int) -> dict[str, Any]:
    """Synthesise streaming into a partial store with checkpoints; publish it."""
    partial = store_dir / ".partial" / "run.zarr"
    published = store_dir / "runs" / "run.zarr"
    start = clock()
    writer = TimedWriter(
        partial,
        sample_dim="sample",
        sample_coords={"seed": ("sample", [case["seed"]])},
        snapshot_name="metamer_snapshot",
        snapshot_dims=("channel", "y", "x"),
        flush_every=every,
    )
    checkpoint = TimedCheckpoint(
        partial.with_suffix(".checkpoint"), every=every, writer=writer, identity="x"
    )
    checkpoint.meta = {"started": "", "at": []}
    result = synthesize_metamer(
        case["model"],
        case["target"],
        [case["seed"]],
        writer,
        checkpoint=checkpoint,
        **case["kwargs"],
    )
    loop = since(start)
    finishing = clock()
    opt = result.optimization
    final = metamer_dataset(result, [case["seed"]])
    now = datetime.now(UTC).isoformat(timespec="seconds")
    attrs = {
        "format_version": FORMAT_VERSION,
        "method": "metamer",
        "run_id": case["spec"]["run_id"],
        "spec": case["spec"],
        "versions": versions(),
        "device": "cpu",
        "dtype": "float32",
        "started": now,
        "finished": now,
        "wall_time_s": round(loop[0], 3),
        "resumed_at": [],
        "status": opt.run_status,
        "stop_reason": opt.stop_reason[0],
        "iterations": int(opt.iterations),
    }
    writer.finish(final, attrs)
    publish(partial, published)
    checkpoint.remove()
    fixed = since(finishing)
    total = since(start)
    if checkpoint.saved != case["kwargs"]["max_iter"] // every:
        raise RuntimeError(f"{checkpoint.saved} checkpoints were saved")
    shutil.rmtree(published)
    return {
        "loop": loop[0],
        "total": total[0],
        "loop_cpu": loop[1],
        "total_cpu": total[1],
        # Wall time in the writer and the checkpoints while the run went, and
        # in finishing and publishing the store after it.
        "streaming": writer.spent + checkpoint.spent,
        "fixed": fixed[0],
        "final": result.metamer,
    }


def run_drop(case: dict[str, Any]) -> dict[str, Any]:
    """The same synthesis, its trajectory dropped and no checkpoint."""
    start = clock()
    result = synthesize_metamer(
        case["model"], case["target"], [case["seed"]], DropRecorder(), **case["kwargs"]
    )
    loop = since(start)
    return {
        "loop": loop[0],
        "total": loop[0],
        "loop_cpu": loop[1],
        "total_cpu": loop[1],
        "final": result.metamer,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=["ps", "onoff"]
    )
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=256)
    parser.add_argument("--warmup-iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "store_overhead.json",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)

    study = plan_study(load_config(args.config))
    results: dict[str, Any] = {
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
        "environment": {
            **versions(),
            "threads": args.threads,
            "machine": platform.machine(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="store_overhead-") as scratch:
        store_dir = Path(scratch)
        for name in args.cases:
            spec = study.runs[CASES[name]]
            case = build_case(spec, args.iterations)
            # Untimed warm-up of both: first calls allocate and import.
            warm = build_case(spec, args.warmup_iterations)
            run_store(warm, store_dir, every=max(1, args.warmup_iterations // 2))
            run_drop(warm)

            times: dict[str, dict[str, list[float]]] = {c: {} for c in CONTENDERS}
            finals = {}
            for rep in range(args.reps):
                order = CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]
                for contender in order:
                    gc.collect()
                    if contender == "store":
                        timing = run_store(case, store_dir, args.checkpoint_every)
                    else:
                        timing = run_drop(case)
                    finals[contender] = timing.pop("final")
                    for kind, seconds in timing.items():
                        times[contender].setdefault(kind, []).append(seconds)
                    print(
                        f"{name} rep {rep} {contender}: "
                        + ", ".join(f"{k} {v:.3f} s" for k, v in timing.items()),
                        flush=True,
                    )
            results["cases"][name] = summarize(spec, args.iterations, times, finals)
    report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"\nWrote {args.output}")
    return results


def summarize(
    spec: dict[str, Any],
    iterations: int,
    times: dict[str, dict[str, list[float]]],
    finals: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Medians, paired ratios and the streaming share of one case."""
    store, drop = times["store"], times["drop"]
    median = statistics.median
    paired = {
        kind: [s / d for s, d in zip(store[kind], drop[kind], strict=True)]
        for kind in ("loop", "total", "loop_cpu", "total_cpu")
    }
    # The time spent in the writer and checkpoints, and in finishing the store,
    # as a share of the same run without a store: unlike the paired ratio, it
    # does not swing with the load that other processes put on the machine.
    drop_loop = median(drop["loop"])
    streaming_share = median(store["streaming"]) / drop_loop
    fixed_share = median(store["fixed"]) / drop_loop
    study_iterations = spec["settings"]["max_iter"]
    return {
        "run": spec["run_id"],
        "iterations": iterations,
        "times_s": times,
        "median_s": {
            c: {kind: median(v) for kind, v in times[c].items()} for c in times
        },
        "paired_ratio": {kind: median(v) for kind, v in paired.items()},
        "paired_ratios": paired,
        "streaming_share": streaming_share,
        "fixed_share": fixed_share,
        "overhead_share": streaming_share + fixed_share,
        # Streaming grows with the iterations, the fixed cost does not: the share
        # of both in a run of the study's own max_iter.
        "study_max_iter": study_iterations,
        "study_overhead_share": streaming_share
        + fixed_share * iterations / study_iterations,
        "max_abs_diff": float((finals["store"] - finals["drop"]).abs().max()),
    }


def report(results: dict[str, Any]) -> None:
    """Print one line per case."""
    print(
        f"\n{'case':<6} {'drop':>7} {'store':>7} {'wall ratio':>10} "
        f"{'cpu ratio':>9} {'streaming':>9} {'fixed':>6} {'overhead':>8} "
        f"{'at max_iter':>11} {'diff':>6}"
    )
    for name, case in results["cases"].items():
        medians, ratio = case["median_s"], case["paired_ratio"]
        print(
            f"{name:<6} {medians['drop']['total']:>6.2f}s "
            f"{medians['store']['total']:>6.2f}s {ratio['total']:>10.4f} "
            f"{ratio['total_cpu']:>9.4f} {100 * case['streaming_share']:>8.2f}% "
            f"{100 * case['fixed_share']:>5.2f}% "
            f"{100 * case['overhead_share']:>7.2f}% "
            f"{100 * case['study_overhead_share']:>10.2f}% "
            f"{case['max_abs_diff']:>6.0e}"
        )
    print(
        "drop, store: median seconds of a whole run; wall and cpu ratio: median of "
        "store/drop within a repetition; streaming: time in the writer and the "
        "checkpoints while the run goes, fixed: finishing and publishing the store, "
        "both as a share of the run without a store; overhead: their sum; "
        "at max_iter: the same over the study's own max_iter"
    )


if __name__ == "__main__":
    main()
