"""The ``stimsynth`` command: audit a study's run stores, tabulate them, or
describe one store.

``stimsynth audit RESULTS`` audits every run store under ``RESULTS/runs`` and
prints the summary; ``stimsynth study RESULTS`` prints a table of every run under
``RESULTS/runs`` and lists the damaged stores; ``stimsynth inspect STORE`` checks
one store completely and describes it. Everything the command prints goes through
:func:`_say`.

Exit codes: 0 when all is well, 1 when a run fails the audit or a store is damaged
or cannot be inspected, 2 for a usage error, an unreadable config, or no stores to
audit or tabulate.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import xarray as xr

from . import __version__
from .audit import audit_study, summarize, write_audit
from .config import ConfigError, load_config
from .escalation import latest_run_stores, with_rounds
from .store import (
    COMPARED_PACKAGES,
    StoreError,
    StoreVerification,
    StoreVersionWarning,
    open_run,
    run_spec,
    verify_run,
    version_differences,
)
from .study import Study, open_study

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# A final variable with at most this many values is shown in full by inspect.
_SMALL = 16

#: Columns of the study table that ``stimsynth study`` prints; ``--csv`` writes all.
STUDY_COLUMNS = (
    "run_id",
    "status",
    "iterations",
    "final_objective",
    "wall_time_s",
    "device",
    "dtype",
)


class _Exit(Exception):
    """Ends the command with an exit code, instead of argparse's ``sys.exit``."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An argument parser that prints through :func:`_say` and does not exit."""

    def print_usage(self, file=None) -> None:
        _say(self.format_usage().rstrip("\n"), error=file is sys.stderr)

    def print_help(self, file=None) -> None:
        _say(self.format_help().rstrip("\n"), error=file is sys.stderr)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            _say(message.rstrip("\n"), error=True)
        raise _Exit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}")


def main(argv: list[str] | None = None) -> int:
    """Run the ``stimsynth`` command.

    Parameters
    ----------
    argv
        The arguments after the program name; None reads ``sys.argv``.

    Returns
    -------
    code
        The exit code: 0 success, 1 a failed audit or an unreadable store, 2 a
        usage error, an unreadable config, or no stores found.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _Exit as stop:
        return stop.code
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # Verbose shows stimsynth's own detail, not that of zarr or xarray.
    logging.getLogger("stimsynth").setLevel(
        logging.DEBUG if args.verbose else logging.WARNING
    )
    return args.handler(args)


def _parser() -> _Parser:
    parser = _Parser(
        prog="stimsynth",
        description="Audit, tabulate and inspect stimsynth run stores.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every check to stderr"
    )
    parser.add_argument(
        "--version", action="version", version=f"stimsynth {__version__}"
    )
    commands = parser.add_subparsers(
        title="commands", dest="subcommand", metavar="COMMAND", required=True
    )

    audit = commands.add_parser(
        "audit",
        help="audit every run store of a study",
        description="Audit every run store under RESULTS/runs and print a summary. "
        "Exits 1 if any run fails the audit.",
    )
    audit.add_argument("results", type=Path, help="the study's results folder")
    audit.add_argument(
        "--config",
        type=Path,
        help="study config whose audit section sets the thresholds "
        "(default: the schema's defaults)",
    )
    audit.add_argument("--csv", type=Path, help="also write the audit table here")
    audit.set_defaults(handler=_audit)

    study = commands.add_parser(
        "study",
        help="tabulate every run store of a study",
        description="Print one line per run store under RESULTS/runs (its status, "
        "iterations, final objective, time and device) and list the stores that "
        "are damaged. Reads metadata and final values only, unless --verify. "
        "Exits 1 if any store is damaged.",
    )
    study.add_argument("results", type=Path, help="the study's results folder")
    study.add_argument(
        "--csv", type=Path, help="also write the whole table (every column) here"
    )
    study.add_argument(
        "--verify",
        action="store_true",
        help="read every chunk of every store, to find damaged trajectories too",
    )
    study.set_defaults(handler=_study)

    inspect = commands.add_parser(
        "inspect",
        help="check and describe one run store",
        description="Read every chunk of a run store, then print what it holds: "
        "its run, outcome, provenance, final numbers and variables, and whether it "
        "was written by other versions of stimsynth, torch or plenoptic. Exits 1 "
        "if the store is damaged.",
    )
    inspect.add_argument("store", type=Path, help="a run store (a .zarr folder)")
    inspect.set_defaults(handler=_inspect)
    return parser


def _say(text: str, error: bool = False) -> None:
    """Print command output: results to stdout, problems to stderr."""
    print(text, file=sys.stderr if error else sys.stdout)


def _audit(args: argparse.Namespace) -> int:
    thresholds = None
    if args.config is not None:
        try:
            thresholds = load_config(args.config)["audit"]
        except ConfigError as error:
            _say(f"stimsynth audit: config {args.config}: {error}", error=True)
            return EXIT_USAGE

    runs = args.results / "runs"
    # After escalation, a run's verdict is that of its last round.
    stores = latest_run_stores(args.results)
    if not stores:
        _say(
            f"stimsynth audit: no run stores found in {runs} (looked for folders "
            "ending in .zarr); give the results folder of a study whose runs have "
            "finished",
            error=True,
        )
        return EXIT_USAGE

    table = with_rounds(audit_study(stores, thresholds))
    if args.csv is not None:
        try:
            write_audit(table, args.csv)
        except OSError as error:
            _say(f"stimsynth audit: cannot write {args.csv}: {error}", error=True)
            return EXIT_USAGE
    _say(summarize(table))
    return EXIT_FAILED if (table["verdict"] == "fail").any() else EXIT_OK


def _study(args: argparse.Namespace) -> int:
    try:
        study = open_study(args.results, verify=args.verify)
    except FileNotFoundError as error:
        _say(f"stimsynth study: {error}", error=True)
        return EXIT_USAGE
    if not len(study) and study.damaged.empty:
        _say(
            f"stimsynth study: no run stores found in {study.root} (looked for "
            "folders ending in .zarr); give the results folder of a study whose "
            "runs have finished",
            error=True,
        )
        return EXIT_USAGE
    if args.csv is not None:
        try:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            study.table.to_csv(args.csv, index=False)
        except OSError as error:
            _say(f"stimsynth study: cannot write {args.csv}: {error}", error=True)
            return EXIT_USAGE
    _say(describe_study(study))
    return EXIT_FAILED if len(study.damaged) else EXIT_OK


def describe_study(study: Study) -> str:
    """A readable account of a study: one line per run, then the damaged stores.

    Parameters
    ----------
    study
        A :class:`stimsynth.study.Study`.

    Returns
    -------
    text
        A count of runs, the columns :data:`STUDY_COLUMNS` of the table, the
        runs written by other versions, and every damaged store with its reason.
    """
    table, damaged = study.table, study.damaged
    lines = [f"{len(table)} runs in {study.root}, {len(damaged)} damaged stores."]
    if len(table):
        lines += [""] + _columns(table[list(STUDY_COLUMNS)])
        other = table[table["version_differences"] != ""]
        if len(other):
            lines += ["", "Written by other versions than this one:"]
            lines += [
                f"{run.run_id}: {run.version_differences}" for run in other.itertuples()
            ]
    if len(damaged):
        lines += ["", "Damaged stores (left out of the table):"]
        lines += [f"{run.run_id}: {run.reason}" for run in damaged.itertuples()]
    return "\n".join(lines)


def _columns(frame: pd.DataFrame) -> list[str]:
    """A table as aligned text: text columns to the left, numbers to the right."""
    cells, numeric = {}, {}
    for name, column in frame.items():
        numeric[name] = pd.api.types.is_numeric_dtype(column)
        cells[name] = [_cell(value) for value in column]
    widths = {
        name: max([len(name), *(len(cell) for cell in column)])
        for name, column in cells.items()
    }

    def line(values: dict[str, str]) -> str:
        return "  ".join(
            f"{values[name]:>{widths[name]}}"
            if numeric[name]
            else f"{values[name]:<{widths[name]}}"
            for name in cells
        ).rstrip()

    rows = [line({name: name for name in cells})]
    rows += [
        line({name: column[i] for name, column in cells.items()})
        for i in range(len(frame))
    ]
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating):
        return f"{value:.4g}"
    return str(value)


def _inspect(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreVersionWarning)
        try:
            verification = verify_run(args.store)
            with open_run(args.store) as dataset:
                text = describe_store(dataset, verification)
        except StoreError as error:
            _say(
                f"stimsynth inspect: {error}; give the path of a finished run store, "
                "such as results/runs/<method>/<group>/<image>/seed0.zarr",
                error=True,
            )
            return EXIT_FAILED
    notes = dict.fromkeys(
        str(warning.message)
        for warning in caught
        if issubclass(warning.category, StoreVersionWarning)
    )
    for note in notes:
        _say(f"stimsynth inspect: warning: {note}", error=True)
    _say(text)
    return EXIT_OK


def describe_store(
    dataset: xr.Dataset, verification: StoreVerification | None = None
) -> str:
    """A readable description of one run store.

    Parameters
    ----------
    dataset
        A store opened with :func:`stimsynth.store.open_run`.
    verification
        What :func:`stimsynth.store.verify_run` read of it, when it was verified.

    Returns
    -------
    text
        The run and its outcome, where and with what it ran (and whether that
        differs from the running versions), how much of it was verified, its final
        numbers (every result variable of at most a few values), and its variables
        with their dimensions.
    """
    attrs = dataset.attrs
    try:
        spec = run_spec(dataset)
    except (KeyError, ValueError):
        spec = {}
    lines = _fields(
        [
            ("run", attrs.get("run_id")),
            ("method", attrs.get("method")),
            ("group", spec.get("group")),
            ("image", spec.get("image")),
            ("seed", spec.get("seed")),
            ("status", attrs.get("status")),
            ("stop reason", attrs.get("stop_reason")),
            ("iterations", attrs.get("iterations")),
            ("wall time", _seconds(attrs.get("wall_time_s"))),
            ("started", attrs.get("started")),
            ("finished", attrs.get("finished")),
            ("device", attrs.get("device")),
            ("dtype", attrs.get("dtype")),
            ("versions", _versions(attrs.get("versions"))),
            ("git commit", attrs.get("git_commit") or "unknown"),
            ("format", attrs.get("format_version")),
            ("resumed at", _resumed(attrs.get("resumed_at"))),
            ("differs", _differences(attrs)),
            ("verified", _verified(verification)),
        ]
    )

    small = [
        name
        for name, variable in sorted(dataset.data_vars.items())
        if not {"iteration", "snapshot"} & set(variable.dims)
        and variable.size <= _SMALL
    ]
    lines += ["", "final numbers:"]
    lines += [
        "  " + line for line in _fields([(n, _numbers(dataset[n])) for n in small])
    ]

    lines += ["", "variables:"]
    rows = [
        (name, f"({', '.join(variable.dims)}) {variable.dtype}")
        for name, variable in sorted(dataset.data_vars.items())
    ]
    lines += ["  " + line for line in _fields(rows)]
    return "\n".join(lines)


def _fields(pairs: list[tuple[str, Any]]) -> list[str]:
    """Aligned ``name  value`` lines."""
    width = max((len(name) for name, _ in pairs), default=0)
    return [f"{name:<{width}}  {value}" for name, value in pairs]


def _seconds(value: Any) -> str:
    return "unknown" if value is None else f"{value} s"


def _resumed(text: str | None) -> str:
    try:
        iterations = json.loads(text) if text else []
    except ValueError:
        return str(text)
    if not iterations:
        return "never"
    return "iterations " + ", ".join(str(i) for i in iterations)


def _differences(attrs: dict) -> str:
    differences = version_differences(attrs)
    if not differences:
        return f"no: written by the running {', '.join(COMPARED_PACKAGES)}"
    return "; ".join(
        f"{name} {written or 'unknown'} (running {running})"
        for name, (written, running) in differences.items()
    )


def _verified(verification: StoreVerification | None) -> str:
    if verification is None:
        return "no"
    return (
        f"every chunk read: {verification.arrays} arrays, {verification.chunks} "
        f"chunk files, {verification.nbytes / 2**20:.3g} MiB"
    )


def _versions(text: str | None) -> str:
    if not text:
        return "unknown"
    try:
        versions = json.loads(text)
    except ValueError:
        return text
    return ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))


def _numbers(variable: xr.DataArray) -> str:
    """The values of a small variable, labelled along its dimension."""
    values = np.asarray(variable.values)
    if variable.ndim == 0:
        return _number(values.item())
    if variable.ndim > 1:
        return np.array2string(values, precision=4)
    dim = variable.dims[0]
    labels = _labels(variable, dim)
    return ", ".join(
        f"{label}: {_number(value)}"
        for label, value in zip(labels, values, strict=True)
    )


def _number(value) -> str:
    """A value to print: numbers to four digits, text as it is."""
    return f"{value:.4g}" if isinstance(value, int | float | np.number) else str(value)


def _labels(variable: xr.DataArray, dim: str) -> list[str]:
    """Names of the entries along ``dim``: its text labels, or ``name=value``."""
    along = [name for name, coord in variable.coords.items() if coord.dims == (dim,)]
    # The dimension's own coordinate (direction, eigenindex) names entries best.
    along.sort(key=lambda name: name != dim)
    if not along:
        return [f"{dim}={i}" for i in range(variable.sizes[dim])]
    name = along[0]
    values = variable.coords[name].values
    if values.dtype.kind in "iuf":
        return [f"{name}={value}" for value in values]
    return [str(value) for value in values]
