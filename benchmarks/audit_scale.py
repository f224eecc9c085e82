"""Time the audit of a study of many run stores.

The claim: auditing 1,000 run stores takes under 30 seconds on a laptop-class CPU.
The stores are copies of a few real ones (by default those of the test suite's
sample study, one store of every method and three more metamers, 60 iterations
each, built here as ``tests/conftest.py`` builds them), laid out as a study's
``runs/`` folder. Each repetition times :func:`stimsynth.audit.audit_study` on all
of them, from the list of stores to the finished table, with the thresholds of a
config's empty ``audit`` section.

The copies were just written, so their files are in the operating system's cache:
the times are those of a re-audit, not of a first read from a cold disk.

With ``--baseline``, the time to merely open every store with
:func:`stimsynth.store.open_run` (xarray) is measured too, and the audit's time is
given as a ratio to it.

Example
-------
::

    .venv/bin/python benchmarks/audit_scale.py --copies 1000 --reps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

from stimsynth.audit import audit_study, find_run_stores
from stimsynth.runner import versions
from stimsynth.store import open_run

REPO = Path(__file__).resolve().parents[1]

#: The claim being checked: seconds for the audit of this many stores.
CLAIM_SECONDS = 30.0
CLAIM_STORES = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--copies",
        type=int,
        default=CLAIM_STORES,
        help=f"run stores to audit (default: {CLAIM_STORES})",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="a runs folder whose stores are copied (default: build the test "
        "suite's sample study, about a minute)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=3,
        help="audits of all the copies; the median is reported (default: 3)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time opening every store with open_run (xarray)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the copies go; kept afterwards (default: a temporary folder, "
        "removed afterwards)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "audit_scale.json",
        help="JSON file of results (default: benchmarks/results/audit_scale.json)",
    )
    return parser.parse_args(argv)


def build_sample(root: Path) -> Path:
    """The test suite's sample study, run without Snakemake; its runs folder."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import SAMPLE_STUDY, build_stores

    return build_stores(root, SAMPLE_STUDY)


def copy_stores(source: Path, runs: Path, copies: int) -> list[Path]:
    """``copies`` stores, copied round-robin from the stores under ``source``,
    each at a run id of its own: ``copyK/<method>/<group>/<image>/seedN``."""
    originals = find_run_stores(source)
    if not originals:
        raise SystemExit(f"no run stores under {source}")
    stores = []
    for number in range(copies):
        original = originals[number % len(originals)]
        store = runs / f"copy{number // len(originals)}" / original.relative_to(source)
        shutil.copytree(original, store)
        stores.append(store)
    return stores


def time_audit(runs: Path) -> tuple[float, dict[str, int]]:
    """Seconds to audit every store under ``runs``, and the verdict counts."""
    start = time.perf_counter()
    table = audit_study(find_run_stores(runs))
    seconds = time.perf_counter() - start
    return seconds, table["verdict"].value_counts().to_dict()


def time_open_run(stores: list[Path]) -> float:
    """Seconds to open (and close) every store with open_run."""
    start = time.perf_counter()
    for store in stores:
        open_run(store).close()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Copy the stores, time the audit, print the claim and write the results."""
    args = parse_args(argv)
    # The audit warns once per failed run; thousands of lines would hide the result.
    logging.getLogger("stimsynth").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    scratch = Path(tempfile.mkdtemp(prefix="audit_scale_"))
    workdir = args.workdir or scratch
    try:
        source = args.source
        if source is None:
            print("Building the sample study...")
            source = build_sample(scratch / "sample")
        runs = workdir / "study" / "runs"
        start = time.perf_counter()
        stores = copy_stores(source, runs, args.copies)
        print(
            f"Copied {len(stores)} stores from {source} in "
            f"{time.perf_counter() - start:.1f} s"
        )

        audits, verdicts = [], {}
        for rep in range(args.reps):
            seconds, verdicts = time_audit(runs)
            audits.append(seconds)
            print(f"audit {rep + 1}/{args.reps}: {seconds:.2f} s")
        opening = time_open_run(stores) if args.baseline else None
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    median = statistics.median(audits)
    per_store = median / len(stores)
    projected = per_store * CLAIM_STORES
    print(
        f"\nAudit of {len(stores)} stores: median {median:.2f} s "
        f"({1000 * per_store:.2f} ms a store; verdicts {verdicts})"
    )
    print(
        f"Claim: {CLAIM_STORES} stores in under {CLAIM_SECONDS:.0f} s. "
        f"{'Measured' if len(stores) == CLAIM_STORES else 'Projected'}: "
        f"{projected:.1f} s, {CLAIM_SECONDS / projected:.1f}x inside the limit"
        if projected < CLAIM_SECONDS
        else f"Claim: {CLAIM_STORES} stores in under {CLAIM_SECONDS:.0f} s. "
        f"NOT MET: {projected:.1f} s"
    )
    if opening is not None:
        print(
            f"Opening every store with open_run alone: {opening:.2f} s; the audit "
            f"takes {median / opening:.2f}x that"
        )

    results = {
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
        "environment": {
            **versions(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "stores": len(stores),
        "audit_s": audits,
        "audit_median_s": median,
        "audit_ms_per_store": 1000 * per_store,
        "open_run_s": opening,
        "verdicts": verdicts,
        "claim_met": projected < CLAIM_SECONDS,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nResults written to {args.output}")


if __name__ == "__main__":
    main()
