"""Time metamer synthesis: stimsynth with a run store, plenoptic, and a bare loop.

Three contenders solve the same metamer problem (same model, target, starting image,
optimiser and number of iterations) in one process:

``stimsynth``
    :func:`stimsynth.synthesis.metamer.synthesize_metamer` streaming its trajectory
    (per-iteration scalars and a snapshot every ``--snapshot-every`` iterations)
    into a real run store through :class:`stimsynth.store.RunWriter`, finished and
    published as :func:`stimsynth.runner.execute_run` does.
``plenoptic``
    ``plenoptic.Metamer(...).setup(...)`` then ``.synthesize(...)``, which keeps its
    losses, penalties, gradient and pixel-change norms in Python lists and, with
    ``store_progress``, copies of the metamer in memory; it writes nothing to disk.
``bare``
    Model forward, loss plus range penalty, backward and optimiser step; nothing else.

Early stopping is disabled in all three, so they run the same iterations. The
contenders are interleaved, their order rotating from one repetition to the next,
and medians are reported: the machine may be shared and timings drift.

Two times are taken per repetition: the *loop* (stimsynth's ``optimize`` call,
plenoptic's ``synthesize`` call, the bare loop) and the *total* (everything from
building the synthesis to a published store, for stimsynth; construction, setup and
synthesis for plenoptic; target representation and loop for the bare loop). Their
difference is a fixed cost per run that longer runs amortise.

Example
-------
::

    .venv/bin/python benchmarks/metamer_speed.py --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import platform
import pstats
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plenoptic as po
import torch
import torch.nn.functional as F

from stimsynth.runner import git_commit, metamer_dataset, versions
from stimsynth.store import FORMAT_VERSION, RunWriter, publish
from stimsynth.synthesis import metamer as metamer_module
from stimsynth.synthesis.metamer import initial_images, synthesize_metamer

CONTENDERS = ("stimsynth", "plenoptic", "bare")
LEARNING_RATE = 0.01
PENALTY_LAMBDA = 0.1
SEED = 0


@dataclass
class Case:
    """One metamer problem: a model, its target and the starting image."""

    name: str
    model: torch.nn.Module
    target: torch.Tensor
    initial: torch.Tensor
    loss: str
    iterations: int

    def plenoptic_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The loss plenoptic and the bare loop use, the same as stimsynth's."""
        if self.loss == "portilla_simoncelli":
            return po.loss.portilla_simoncelli_loss_factory(self.model, self.target)
        return po.loss.mse


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A model in evaluation mode with gradients off, as stimsynth builds them."""
    model.eval()
    po.remove_grad(model)
    return model


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The problems to time, from the command line.

    Parameters
    ----------
    args
        Parsed command line.

    Returns
    -------
    cases
        Portilla-Simoncelli on 256x256 Einstein and the pretrained OnOff model on
        Einstein resized (area average) to 128x128, as selected by ``--cases``.
    """
    einstein = po.data.einstein().to(torch.float32)
    cases = []
    if "ps" in args.cases:
        target = einstein
        model = frozen(po.models.PortillaSimoncelli(target.shape[-2:], n_scales=4))
        cases.append(
            Case(
                "portilla_simoncelli_256",
                model,
                target,
                initial_images("gray", target, [SEED]),
                "portilla_simoncelli",
                args.ps_iterations,
            )
        )
    if "onoff" in args.cases:
        target = F.interpolate(einstein, size=(128, 128), mode="area")
        model = frozen(po.models.OnOff(31, pretrained=True, cache_filt=True))
        cases.append(
            Case(
                "onoff_128",
                model,
                target,
                initial_images("gray", target, [SEED]),
                "mse",
                args.onoff_iterations,
            )
        )
    return cases


@contextlib.contextmanager
def timed_optimize(times: list[float]) -> Iterator[None]:
    """Time stimsynth's optimisation loop by wrapping the ``optimize`` it calls."""
    original = metamer_module.optimize

    def wrapper(*args: Any, **kwargs: Any):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    metamer_module.optimize = wrapper
    try:
        yield
    finally:
        metamer_module.optimize = original


def run_stimsynth(
    case: Case, iterations: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """Synthesise with stimsynth, streaming into a run store that is then published.

    Returns
    -------
    timing
        ``loop`` and ``total`` seconds and the final image.
    """
    store_dir: Path = settings["store_dir"]
    partial = store_dir / f"{case.name}.partial.zarr"
    published = store_dir / f"{case.name}.zarr"
    loop: list[float] = []
    start = time.perf_counter()
    writer = RunWriter(
        partial,
        sample_dim="sample",
        sample_coords={"seed": ("sample", [SEED])},
        snapshot_name="metamer_snapshot",
        snapshot_dims=("channel", "y", "x"),
        flush_every=settings["flush_every"],
    )
    with timed_optimize(loop):
        result = synthesize_metamer(
            case.model,
            case.target,
            [SEED],
            writer,
            max_iter=iterations,
            optimizer={"name": "adam", "lr": LEARNING_RATE, "amsgrad": True},
            penalty_lambda=PENALTY_LAMBDA,
            # Tolerances of zero: the convergence test runs but never passes.
            stop={"abs_tol": 0.0, "rel_tol": 0.0},
            snapshot_every=settings["snapshot_every"],
            loss=case.loss,
            initial=case.initial,
        )
    opt = result.optimization
    if opt.iterations != iterations:
        raise RuntimeError(
            f"stimsynth stopped after {opt.iterations} of {iterations} iterations"
        )
    final = metamer_dataset(result, [SEED])
    attrs = {
        **settings["provenance"],
        "format_version": FORMAT_VERSION,
        "method": "metamer",
        "run_id": f"benchmark-{case.name}",
        "spec": {"benchmark": case.name, "max_iter": iterations},
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "status": opt.run_status,
        "stop_reason": opt.stop_reason[0],
        "iterations": int(opt.iterations),
    }
    writer.finish(final, attrs)
    publish(partial, published)
    total = time.perf_counter() - start
    shutil.rmtree(published)
    return {"loop": loop[0], "total": total, "final": result.metamer}


def run_plenoptic(
    case: Case, iterations: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """Synthesise with ``plenoptic.Metamer``, keeping progress in memory.

    Returns
    -------
    timing
        ``loop`` and ``total`` seconds and the final image.
    """
    # plenoptic's progress bar writes to stderr at every iteration; it is part of
    # its cost, but its output is not wanted here.
    with contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        metamer = po.Metamer(
            case.target,
            case.model,
            loss_function=case.plenoptic_loss(),
            penalty_lambda=PENALTY_LAMBDA,
        )
        metamer.setup(
            case.initial,
            optimizer=torch.optim.Adam,
            optimizer_kwargs={"lr": LEARNING_RATE, "amsgrad": True},
        )
        loop_start = time.perf_counter()
        # A stop criterion of zero is never met: |change| < 0 is always false.
        metamer.synthesize(
            max_iter=iterations,
            store_progress=settings["snapshot_every"],
            stop_criterion=0.0,
        )
        end = time.perf_counter()
    if len(metamer.losses) != iterations + 1:
        raise RuntimeError(
            f"plenoptic ran {len(metamer.losses) - 1} of {iterations} iterations"
        )
    return {
        "loop": end - loop_start,
        "total": end - start,
        "final": metamer.metamer.detach(),
    }


def run_bare(case: Case, iterations: int, settings: dict[str, Any]) -> dict[str, Any]:
    """The optimisation with nothing around it.

    Returns
    -------
    timing
        ``loop`` and ``total`` seconds and the final image.
    """
    start = time.perf_counter()
    loss_function = case.plenoptic_loss()
    with torch.no_grad():
        target_representation = case.model(case.target)
    image = case.initial.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([image], lr=LEARNING_RATE, amsgrad=True)
    loop_start = time.perf_counter()
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = loss_function(case.model(image), target_representation)
        objective = loss + PENALTY_LAMBDA * po.regularize.penalize_range(image)
        objective.backward()
        optimizer.step()
    end = time.perf_counter()
    return {"loop": end - loop_start, "total": end - start, "final": image.detach()}


RUNNERS = {"stimsynth": run_stimsynth, "plenoptic": run_plenoptic, "bare": run_bare}


def time_case(
    case: Case, args: argparse.Namespace, settings: dict[str, Any]
) -> dict[str, Any]:
    """Warm up, then time the contenders interleaved, rotating their order.

    Returns
    -------
    results
        Per contender, the seconds of every repetition and their medians, and the
        largest pixel difference of each contender's final image from the bare
        loop's.
    """
    for name in CONTENDERS:
        RUNNERS[name](case, args.warmup_iterations, settings)
    reps: dict[str, list[dict[str, float]]] = {name: [] for name in CONTENDERS}
    finals: dict[str, torch.Tensor] = {}
    for rep in range(args.reps):
        order = CONTENDERS[rep % 3 :] + CONTENDERS[: rep % 3]
        for name in order:
            gc.collect()
            outcome = RUNNERS[name](case, case.iterations, settings)
            finals[name] = outcome.pop("final")
            reps[name].append(outcome)
            print(
                f"  {case.name} rep {rep + 1}/{args.reps} {name:>9}: "
                f"loop {outcome['loop']:.3f} s, total {outcome['total']:.3f} s",
                flush=True,
            )
    summary: dict[str, Any] = {"iterations": case.iterations, "contenders": {}}
    for name in CONTENDERS:
        loops = [r["loop"] for r in reps[name]]
        totals = [r["total"] for r in reps[name]]
        summary["contenders"][name] = {
            "loop_s": loops,
            "total_s": totals,
            "loop_per_iter_s": statistics.median(loops) / case.iterations,
            "total_per_iter_s": statistics.median(totals) / case.iterations,
            "fixed_s": statistics.median(
                t - lo for t, lo in zip(totals, loops, strict=True)
            ),
            "max_abs_diff_from_bare": float(
                (finals[name] - finals["bare"]).abs().max()
            ),
        }
    summary["ratios"] = ratios(reps)
    return summary


def ratios(reps: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """stimsynth's time over plenoptic's and over the bare loop's.

    Both the ratio of medians and the median of the ratios within a repetition
    (contenders timed back to back, so less exposed to drift) are given.
    """
    out = {}
    for other in ("plenoptic", "bare"):
        for kind in ("loop", "total"):
            ours = [r[kind] for r in reps["stimsynth"]]
            theirs = [r[kind] for r in reps[other]]
            out[f"stimsynth/{other} {kind}"] = {
                "ratio_of_medians": statistics.median(ours) / statistics.median(theirs),
                "median_paired_ratio": statistics.median(
                    a / b for a, b in zip(ours, theirs, strict=True)
                ),
            }
    return out


def print_table(name: str, summary: dict[str, Any]) -> None:
    """Print one case's medians and ratios."""
    print(f"\n{name}: {summary['iterations']} iterations per repetition")
    print(
        f"  {'contender':<10} {'loop s/iter':>12} {'total s/iter':>13} "
        f"{'fixed s':>8} {'max|x-bare|':>12}"
    )
    for contender, row in summary["contenders"].items():
        print(
            f"  {contender:<10} {row['loop_per_iter_s']:>12.5f} "
            f"{row['total_per_iter_s']:>13.5f} {row['fixed_s']:>8.3f} "
            f"{row['max_abs_diff_from_bare']:>12.2e}"
        )
    print(f"  {'ratio':<26} {'of medians':>10} {'median paired':>14}")
    for label, value in summary["ratios"].items():
        print(
            f"  {label:<26} {value['ratio_of_medians']:>10.4f} "
            f"{value['median_paired_ratio']:>14.4f}"
        )


def profile_stimsynth(
    case: Case, settings: dict[str, Any], path: Path, top: int
) -> None:
    """Profile one stimsynth run with cProfile; save the stats and print the top."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_stimsynth(case, case.iterations, settings)
    profiler.disable()
    profiler.dump_stats(path)
    print(f"\nProfile of stimsynth on {case.name} (saved to {path}):")
    stats = pstats.Stats(profiler, stream=None).sort_stats("tottime")
    stats.print_stats(top)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=("ps", "onoff"),
        default=["ps", "onoff"],
        help="problems to time (default: both)",
    )
    parser.add_argument(
        "--ps-iterations",
        type=int,
        default=30,
        help="iterations per repetition for Portilla-Simoncelli (default: 30)",
    )
    parser.add_argument(
        "--onoff-iterations",
        type=int,
        default=60,
        help="iterations per repetition for OnOff (default: 60)",
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed repetitions (default: 5)"
    )
    parser.add_argument(
        "--warmup-iterations",
        type=int,
        default=3,
        help="iterations of the untimed warm-up run of each contender (default: 3)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default: 1)"
    )
    parser.add_argument(
        "--snapshot-every",
        type=int,
        default=50,
        help="snapshot interval, stimsynth and plenoptic alike (default: 50)",
    )
    parser.add_argument(
        "--flush-every",
        type=int,
        default=250,
        help="iterations stimsynth buffers between appends (default: 250)",
    )
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="where stimsynth's run stores go (default: a temporary directory)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "metamer_speed.json",
        help="JSON file of results (default: benchmarks/results/metamer_speed.json)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one stimsynth run per case with cProfile",
    )
    parser.add_argument(
        "--profile-top",
        type=int,
        default=25,
        help="functions to print from each profile (default: 25)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Time every case and write the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    warnings.filterwarnings("ignore", category=UserWarning, module="plenoptic")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    cleanup = args.store_dir is None
    store_dir = (
        Path(tempfile.mkdtemp(prefix="metamer_speed_")) if cleanup else args.store_dir
    )
    store_dir.mkdir(parents=True, exist_ok=True)
    # Provenance is gathered once: it is the same for every run of this process.
    settings = {
        "store_dir": store_dir,
        "snapshot_every": args.snapshot_every,
        "flush_every": args.flush_every,
        "provenance": {
            "versions": versions(),
            "git_commit": git_commit(),
            "device": "cpu",
            "dtype": "float32",
        },
    }
    results: dict[str, Any] = {
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
        "environment": {
            **settings["provenance"]["versions"],
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "cases": {},
    }
    try:
        cases = build_cases(args)
        for case in cases:
            print(f"Timing {case.name} ...", flush=True)
            results["cases"][case.name] = time_case(case, args, settings)
        for name, summary in results["cases"].items():
            print_table(name, summary)
        if args.profile:
            for case in cases:
                path = args.output.with_name(f"{args.output.stem}-{case.name}.pstats")
                profile_stimsynth(case, settings, path, args.profile_top)
    finally:
        if cleanup:
            shutil.rmtree(store_dir, ignore_errors=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nResults written to {args.output}")


if __name__ == "__main__":
    main()
