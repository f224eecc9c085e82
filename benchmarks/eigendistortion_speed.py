"""Time eigendistortion methods and measure how close they get to the exact answer.

Every method in :data:`stimsynth.synthesis.eigendistortion.METHODS` (the exact one
only up to ``--exact-max-pixels``) and plenoptic's power method
(``plenoptic.Eigendistortion(image, model).synthesize(method="power", k=1, ...)``)
look for the top and bottom eigendistortion of the Fisher information matrix of the
same model at the same image: plenoptic's pretrained OnOff front end (kernel 31) at
Einstein resized by area averaging.

Reported per method: wall time, iterations, products ``F v`` with the Fisher matrix
(the cost of every method: two backward passes each), and the error of the top and
bottom eigenvalue relative to the exact eigendecomposition, together with the
alignment ``|<v, v_exact>|`` of the eigendistortions. The exact result comes from
stimsynth's ``exact`` method, at the same dtype unless ``--reference-dtype`` asks for
another (then it is computed once more, untimed); without it (an image above
``--exact-max-pixels``) errors are not given. In float32 the exact bottom eigenvalue
is itself only good to about 1e-2 relative for a Fisher matrix whose eigenvalues span
four decades, as here: smaller bottom errors need ``--reference-dtype float64``
(Fisher products are several times slower in float64).

The tolerances of the two libraries mean different things: stimsynth's iterative
methods stop when every residual ``|F v - lambda v|`` is below ``tol * lambda_max``
(and, for ``power``, the eigenvalue is steady); plenoptic's power method stops when
the eigenvalue changes by less than ``--plenoptic-tol`` (absolute) in one iteration.

Example
-------
::

    .venv/bin/python benchmarks/eigendistortion_speed.py --size 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import plenoptic as po
import torch
import torch.nn.functional as F
from plenoptic._synthesize import autodiff as po_autodiff
from plenoptic._synthesize import eigendistortion as po_eigendistortion

from stimsynth.runner import versions
from stimsynth.synthesis import eigendistortion as ours
from stimsynth.synthesis.eigendistortion import METHODS, synthesize_eigendistortion

SEED = 0


class ListRecorder:
    """Keeps a run's per-iteration trace in memory."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, np.ndarray]]] = []

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        """Keep one iteration's scalars."""
        self.rows.append((iteration, scalars))

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        """Eigendistortion methods keep no snapshots."""


@contextlib.contextmanager
def counted_products(counter: dict[str, int]) -> Iterator[None]:
    """Count the vectors stimsynth's Fisher operator multiplies, in any method."""
    original = ours.FisherOperator.matvec

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        counter["products"] += len(vectors)
        return original(self, vectors)

    ours.FisherOperator.matvec = matvec
    try:
        yield
    finally:
        ours.FisherOperator.matvec = original


@contextlib.contextmanager
def counted_plenoptic_products(counter: dict[str, int]) -> Iterator[None]:
    """Count plenoptic's Fisher products: the power step's and the eigenvalue's.

    Each call of ``_fisher_info_matrix_vector_product`` from the eigendistortion
    module is a power step (one per iteration, plus one start per end); each call
    from ``autodiff`` is the product inside an eigenvalue estimate.
    """
    step = po_eigendistortion._fisher_info_matrix_vector_product
    inner = po_autodiff._fisher_info_matrix_vector_product

    def counting(function, key):
        def wrapper(y, x, v, dummy_vec):
            counter[key] += 1
            counter["products"] += v.shape[1]
            return function(y, x, v, dummy_vec)

        return wrapper

    po_eigendistortion._fisher_info_matrix_vector_product = counting(step, "steps")
    po_autodiff._fisher_info_matrix_vector_product = counting(inner, "estimates")
    try:
        yield
    finally:
        po_eigendistortion._fisher_info_matrix_vector_product = step
        po_autodiff._fisher_info_matrix_vector_product = inner


def run_stimsynth(
    model: torch.nn.Module, image: torch.Tensor, method: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One stimsynth run: its time, cost and top and bottom eigenpairs."""
    counter = {"products": 0}
    with counted_products(counter):
        start = time.perf_counter()
        result = synthesize_eigendistortion(
            model,
            image,
            SEED,
            ListRecorder(),
            method=method,
            k=1,
            max_iter=args.max_iter,
            tol=args.tol,
            memory_budget_mb=args.memory_budget_mb,
        )
        wall = time.perf_counter() - start
    n = image.numel()
    index = list(result.eigenindex)
    pairs = {}
    for end, wanted in (("top", 0), ("bottom", n - 1)):
        if wanted in index:
            i = index.index(wanted)
            pairs[end] = (
                float(result.eigenvalues[i]),
                result.eigendistortions[i].flatten().to(torch.float64),
            )
    return {
        "wall_s": wall,
        "iterations": int(result.iterations),
        "products": counter["products"],
        "status": result.status,
        "stop_reason": result.stop_reason,
        "pairs": pairs,
    }


def run_plenoptic(
    model: torch.nn.Module, image: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """One plenoptic power-method run: its time, cost and eigenpairs."""
    counter = {"products": 0, "steps": 0, "estimates": 0}
    # Its progress bars go to stderr, its messages to stdout.
    messages = io.StringIO()
    with (
        counted_plenoptic_products(counter),
        contextlib.redirect_stdout(messages),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        start = time.perf_counter()
        eigendistortion = po.Eigendistortion(image, model)
        eigendistortion.synthesize(
            method="power",
            k=1,
            max_iter=args.max_iter,
            stop_criterion=args.plenoptic_tol,
        )
        wall = time.perf_counter() - start
    values = eigendistortion.eigenvalues
    vectors = eigendistortion.eigendistortions.flatten(1).to(torch.float64)
    stopped = [
        line.strip()
        for line in messages.getvalue().splitlines()
        if "Stop criterion" in line
    ]
    return {
        "wall_s": wall,
        # Power steps of both ends, each one product; every step is followed by
        # one more product for the eigenvalue estimate.
        "iterations": counter["steps"],
        "products": counter["products"],
        "status": "converged" if len(stopped) == 2 else "max_iter",
        "stop_reason": "; ".join(stopped) or f"reached max_iter={args.max_iter}",
        "pairs": {
            "top": (float(values[0]), vectors[0]),
            "bottom": (float(values[-1]), vectors[-1]),
        },
    }


def warm_up(model: torch.nn.Module, image: torch.Tensor) -> None:
    """A few Fisher products, so that no method pays torch's first-call costs."""
    operator = ours.FisherOperator(model, image)
    generator = torch.Generator().manual_seed(SEED)
    vectors = torch.randn((2, operator.n_pixels), generator=generator).to(image)
    for _ in range(3):
        operator.matvec(vectors)


def compare(
    run: dict[str, Any], reference: dict[str, Any] | None
) -> dict[str, dict[str, float]]:
    """Eigenvalues, their relative errors and eigenvector alignments per end."""
    out = {}
    for end, (value, vector) in run["pairs"].items():
        entry = {"eigenvalue": value}
        if reference is not None and end in reference["pairs"]:
            exact, exact_vector = reference["pairs"][end]
            entry["relative_error"] = abs(value - exact) / abs(exact)
            entry["alignment"] = float(
                (vector @ exact_vector).abs() / (vector.norm() * exact_vector.norm())
            )
        out[end] = entry
    return out


def load_problem(
    args: argparse.Namespace, dtype_name: str
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and the image, at the requested size and the given dtype."""
    dtype = getattr(torch, dtype_name)
    image = F.interpolate(po.data.einstein(), size=(args.size, args.size), mode="area")
    model = po.models.OnOff(31, pretrained=True, cache_filt=True)
    model.eval()
    po.remove_grad(model)
    return model.to(dtype), image.to(dtype)


def fmt(value: float | None, spec: str) -> str:
    """A number for the table, or a dash."""
    return "-" if value is None or not np.isfinite(value) else format(value, spec)


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    """Print time, cost and accuracy per method."""
    print(
        f"\n{'method':<18} {'wall s':>8} {'iters':>6} {'F v':>6} {'status':>9} "
        f"{'top lambda':>11} {'top rel err':>11} {'top |cos|':>9} "
        f"{'bottom lambda':>13} {'bot rel err':>11} {'bot |cos|':>9}"
    )
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<18} failed: {row['error']}")
            continue
        top = row["ends"].get("top", {})
        bottom = row["ends"].get("bottom", {})
        print(
            f"{name:<18} {row['wall_s']:>8.2f} {row['iterations']:>6d} "
            f"{row['products']:>6d} {row['status']:>9} "
            f"{fmt(top.get('eigenvalue'), '.5g'):>11} "
            f"{fmt(top.get('relative_error'), '.2e'):>11} "
            f"{fmt(top.get('alignment'), '.6f'):>9} "
            f"{fmt(bottom.get('eigenvalue'), '.5g'):>13} "
            f"{fmt(bottom.get('relative_error'), '.2e'):>11} "
            f"{fmt(bottom.get('alignment'), '.6f'):>9}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=int, default=64, help="image side in pixels (default: 64)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of model and image (default: float32, the study's default)",
    )
    parser.add_argument(
        "--reference-dtype",
        choices=("float32", "float64"),
        default=None,
        help="dtype of the exact reference (default: that of --dtype)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"stimsynth methods to time (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument(
        "--max-iter",
        type=int,
        default=1500,
        help="max_iter of every iterative method, both libraries (default: 1500)",
    )
    parser.add_argument(
        "--tol", type=float, default=5e-4, help="stimsynth's tol (default: 5e-4)"
    )
    parser.add_argument(
        "--plenoptic-tol",
        type=float,
        default=1e-7,
        help="plenoptic's stop_criterion, its default (default: 1e-7)",
    )
    parser.add_argument(
        "--no-plenoptic", action="store_true", help="do not time plenoptic"
    )
    parser.add_argument(
        "--exact-max-pixels",
        type=int,
        default=4096,
        help="skip the exact method above this many pixels (default: 4096)",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        default=2048,
        help="memory_budget_mb passed to stimsynth (default: 2048)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=1,
        help="runs per method; the median wall time is reported (default: 1)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default: 1)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "eigendistortion_speed.json",
        help="JSON file of results "
        "(default: benchmarks/results/eigendistortion_speed.json)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run every method, compare with the exact result and write the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="plenoptic")
    model, image = load_problem(args, args.dtype)
    n = image.numel()
    methods = list(args.methods or METHODS)
    if "exact" in methods and n > args.exact_max_pixels:
        print(
            f"Skipping exact: {n} pixels > --exact-max-pixels {args.exact_max_pixels}"
        )
        methods.remove("exact")
    # The exact method first: the others are compared with it.
    methods.sort(key=lambda name: name != "exact")
    contenders = [(f"stimsynth {m}", m) for m in methods]
    if not args.no_plenoptic:
        contenders.append(("plenoptic power", None))

    warm_up(model, image)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
    errors: dict[str, str] = {}
    for rep in range(args.reps):
        for name, method in contenders:
            if name in errors:
                continue
            print(f"rep {rep + 1}/{args.reps}: {name} ...", flush=True)
            try:
                if method is None:
                    run = run_plenoptic(model, image, args)
                else:
                    run = run_stimsynth(model, image, method, args)
            except Exception as error:  # a method being developed may fail
                errors[name] = f"{type(error).__name__}: {error}"
                print(f"  failed: {errors[name]}", flush=True)
                continue
            runs[name].append(run)
            print(
                f"  {run['wall_s']:.2f} s, {run['iterations']} iterations, "
                f"{run['products']} products, {run['status']}",
                flush=True,
            )

    reference = None
    reference_dtype = args.reference_dtype or args.dtype
    if reference_dtype != args.dtype and n <= args.exact_max_pixels:
        print(f"reference: stimsynth exact in {reference_dtype} ...", flush=True)
        reference_model, reference_image = load_problem(args, reference_dtype)
        reference = run_stimsynth(reference_model, reference_image, "exact", args)
        print(f"  {reference['wall_s']:.2f} s", flush=True)
    elif runs.get("stimsynth exact"):
        reference = runs["stimsynth exact"][0]
    rows: dict[str, dict[str, Any]] = {}
    for name, _ in contenders:
        if name in errors:
            rows[name] = {"error": errors[name]}
            continue
        last = runs[name][-1]
        rows[name] = {
            "wall_s": statistics.median(r["wall_s"] for r in runs[name]),
            "wall_s_all": [r["wall_s"] for r in runs[name]],
            "iterations": last["iterations"],
            "products": last["products"],
            "status": last["status"],
            "stop_reason": last["stop_reason"],
            "ends": compare(last, reference),
        }
    print(
        f"\nOnOff(31, pretrained) at a {args.size}x{args.size} Einstein ({n} pixels), "
        f"{args.dtype}, {torch.get_num_threads()} thread(s); max_iter {args.max_iter}, "
        f"stimsynth tol {args.tol:g}, plenoptic stop_criterion {args.plenoptic_tol:g}"
    )
    if reference is None:
        print("No exact result: relative errors are not available.")
    else:
        print(f"Errors are relative to stimsynth exact in {reference_dtype}.")
    print_table(rows)
    for name, row in rows.items():
        if "stop_reason" in row:
            print(f"{name}: {row['stop_reason']}")

    results = {
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
        "environment": {
            **versions(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "n_pixels": n,
        "reference_dtype": reference_dtype if reference is not None else None,
        "methods": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nResults written to {args.output}")


if __name__ == "__main__":
    main()
