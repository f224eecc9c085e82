"""The convergence audit: a verdict with reasons for every run store.

A run's own status says only whether its stop rule was met. The audit asks whether
its result can be used: every store gets a row with the verdict ``pass`` or
``fail`` and, in ``reasons``, every check that was made, with its numbers and its
limit. The checks are:

- every run: its status is not ``diverged`` or ``failed``, and its final result
  variables and per-iteration objective hold no NaN or inf;
- metamer: the final representation loss is a small enough fraction of the
  initial one, and no pixel of the metamer lies far outside [0, 1];
- MAD competition: all four directions are present, each optimized metric moved
  the asked way from its start, and each reference metric stayed near its start;
- eigendistortion: the largest eigenpair residual is small relative to the top
  eigenvalue, the top eigenvalue is above the bottom one, and every
  eigendistortion has unit norm;
- geodesic: the endpoints of the path are those it started with, and its energy
  is at most a set fraction of the straight pixel fade's.

A run that stopped at ``max_iter`` passes when its method's checks pass; its reasons
say that it stopped there. The limits come from the ``audit`` section of a study
config, whose defaults live in the config schema alone.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .config import validate_config
from .store import FORMAT_VERSION, StoreError, open_run, run_spec
from .synthesis.optimize import FAILED_STATUSES, USABLE_STATUSES

logger = logging.getLogger(__name__)

#: Columns of the audit table, in order.
COLUMNS = (
    "run_id",
    "method",
    "group",
    "model",
    "image",
    "seed",
    "iterations",
    "final_objective",
    "status",
    "stop_reason",
    "verdict",
    "reasons",
    "wall_time_s",
    "store",
)

#: Variables holding each method's result, which must be finite.
RESULT_VARIABLES = {
    "metamer": ("metamer", "initial_loss", "final_loss"),
    "mad": ("mad_image", "final_optimized_metric", "final_reference_metric"),
    "eigendistortion": ("eigendistortion", "eigenvalue", "residual"),
    "geodesic": ("path", "step_energy", "final_path_energy"),
}

#: Per-iteration objective of each method; for an eigendistortion, the eigenvalue
#: estimates of the power method, which is what it drives up or down.
OBJECTIVE_VARIABLES = {
    "metamer": "objective",
    "mad": "objective",
    "eigendistortion": "eigenvalue_trace",
    "geodesic": "objective",
}

# Iterations over which an eigenvalue estimate must hold still, as the power
# method's own stop rule asks.
EIGENVALUE_WINDOW = 50

# Tolerance on |norm - 1| of an eigendistortion; eigendistortions are normalised
# in float32, whose rounding alone stays far below this.
UNIT_NORM_TOLERANCE = 1e-3

# The schema requires one image; the audit section validates independently of it.
_MINIMAL_CONFIG = {"images": {"a": {"source": "plenoptic:einstein", "size": [8, 8]}}}


@dataclass(frozen=True)
class _Check:
    """One audit check: what was checked, whether it passed, and its numbers."""

    name: str
    passed: bool
    detail: str

    @property
    def text(self) -> str:
        # "; " separates checks in the reasons text, so a detail never holds one.
        detail = self.detail.replace("; ", ", ")
        return f"{'' if self.passed else 'FAIL '}{self.name}: {detail}"


def default_thresholds() -> dict[str, dict[str, float]]:
    """The audit thresholds a study gets when its config sets none.

    They are read from the config schema, the one place they are defined, by
    validating a minimal config.

    Returns
    -------
    thresholds
        Limits by method, such as ``{"metamer": {"max_relative_loss": 0.01, ...}}``.

    Examples
    --------
    >>> default_thresholds()["geodesic"]
    {'max_energy_ratio': 1.0}
    """
    return resolve_thresholds(None)


def resolve_thresholds(
    thresholds: dict[str, dict[str, float]] | None,
) -> dict[str, dict[str, float]]:
    """Validate audit thresholds and fill in the defaults of those left out.

    Parameters
    ----------
    thresholds
        An ``audit`` section of a study config, complete or partial, or None.

    Returns
    -------
    thresholds
        Every threshold of every method.

    Raises
    ------
    stimsynth.config.ConfigError
        If a threshold is unknown or out of range; the message names it.
    """
    config = copy.deepcopy(_MINIMAL_CONFIG)
    config["audit"] = copy.deepcopy(thresholds) if thresholds else {}
    return validate_config(config)["audit"]


def audit_run(
    path: str | os.PathLike,
    thresholds: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Audit one run store: its verdict, the reasons for it, and what identifies it.

    A store that cannot be opened or read gets the verdict ``fail`` with the error
    as its reason, so that one damaged store does not stop the audit of a study.

    Parameters
    ----------
    path
        The run store.
    thresholds
        Limits by method, as in a config's ``audit`` section; missing ones take
        their defaults.

    Returns
    -------
    row
        One value for each name in :data:`COLUMNS`. ``reasons`` joins the text of
        every check with ``"; "``; a failed check starts with ``FAIL``.

    Raises
    ------
    stimsynth.config.ConfigError
        If ``thresholds`` holds an unknown or out-of-range threshold.
    """
    return _audit_run(Path(path), resolve_thresholds(thresholds))


def _audit_run(path: Path, limits: dict[str, dict[str, float]]) -> dict[str, Any]:
    """:func:`audit_run` with thresholds already validated."""
    row = dict.fromkeys(COLUMNS)
    row.update(run_id=_run_id_from_path(path), store=str(path))
    try:
        with open_run(path) as dataset:
            row.update(_identify(dataset))
            checks = _checks(dataset, row["method"], limits)
            row["final_objective"] = _final_objective(dataset, row["method"])
    except Exception as error:
        # Reading a damaged store can fail in zarr, its codecs or xarray in many
        # ways; each becomes a failed row rather than an aborted audit.
        logger.warning("Cannot audit %s: %s", path, _describe_error(error))
        logger.debug("Traceback of the failed audit of %s", path, exc_info=True)
        checks = [_Check("store", False, f"cannot be read ({_describe_error(error)})")]

    row["verdict"] = "pass" if all(check.passed for check in checks) else "fail"
    row["reasons"] = "; ".join(check.text for check in checks)
    logger.debug("Audit of %s: %s (%s)", row["run_id"], row["verdict"], row["reasons"])
    return row


def audit_study(
    paths: Iterable[str | os.PathLike],
    thresholds: dict[str, dict[str, float]] | None = None,
) -> pd.DataFrame:
    """Audit every run store of a study.

    Parameters
    ----------
    paths
        The run stores.
    thresholds
        Limits by method, as in a config's ``audit`` section; missing ones take
        their defaults.

    Returns
    -------
    table
        One row per store with the columns :data:`COLUMNS`, sorted by run id.
    """
    limits = resolve_thresholds(thresholds)
    rows = [_audit_run(Path(path), limits) for path in paths]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table = table.sort_values("run_id", kind="stable", ignore_index=True)

    failed = int((table["verdict"] == "fail").sum())
    logger.info(
        "Audited %d runs: %d pass, %d fail", len(table), len(table) - failed, failed
    )
    if failed:
        logger.warning(
            "%d of %d runs failed the audit",
            failed,
            len(table),
        )
    return table


def summarize(table: pd.DataFrame) -> str:
    """A short text account of an audit table.

    Parameters
    ----------
    table
        The table of :func:`audit_study`.

    Returns
    -------
    summary
        The counts of runs per method and verdict, then one line per failed run
        with its status and the checks it failed.
    """
    failed = table[table["verdict"] == "fail"]
    lines = [
        f"Audit of {len(table)} runs: {len(table) - len(failed)} pass, "
        f"{len(failed)} fail."
    ]
    if table.empty:
        return lines[0]

    methods = table["method"].fillna("unreadable")
    counts = pd.crosstab(methods, table["verdict"])
    counts = counts.reindex(columns=["pass", "fail"], fill_value=0)
    width = max(len("method"), *(len(method) for method in counts.index))
    lines += ["", f"{'method':<{width}}  {'pass':>5}  {'fail':>5}"]
    for method, (passed, fails) in counts.iterrows():
        lines.append(f"{method:<{width}}  {passed:>5}  {fails:>5}")

    if failed.empty:
        lines += ["", "Every run passed."]
        return "\n".join(lines)
    lines += ["", "Failed runs:"]
    for run in failed.itertuples():
        reasons = [
            reason.removeprefix("FAIL ")
            for reason in run.reasons.split("; ")
            if reason.startswith("FAIL ")
        ]
        status = run.status if isinstance(run.status, str) else "no status"
        lines.append(f"{run.run_id} [{status}]: {'; '.join(reasons)}")
    return "\n".join(lines)


def write_audit(
    table: pd.DataFrame,
    csv_path: str | os.PathLike,
    summary_path: str | os.PathLike | None = None,
) -> None:
    """Write an audit table as CSV and, optionally, its summary as text.

    Parameters
    ----------
    table
        The table of :func:`audit_study`.
    csv_path
        Where the table goes.
    summary_path
        Where the text of :func:`summarize` goes; None writes no summary.
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
    logger.info("Wrote the audit table of %d runs to %s", len(table), csv_path)
    if summary_path is not None:
        summary_path = Path(summary_path)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(summarize(table) + "\n")
        logger.info("Wrote the audit summary to %s", summary_path)


def find_run_stores(folder: str | os.PathLike) -> list[Path]:
    """Every run store under a folder, searched recursively.

    A run store is a directory whose name ends in ``.zarr`` and that holds a
    ``zarr.json`` at its top. The search does not descend into stores. A
    ``.zarr`` directory without ``zarr.json`` is skipped with a warning.

    Parameters
    ----------
    folder
        Where to search, such as a study's ``results/runs``.

    Returns
    -------
    stores
        Paths of the stores, sorted.
    """
    stores = []
    for parent, dirnames, _ in os.walk(folder):
        descend = []
        for name in dirnames:
            child = Path(parent) / name
            if not name.endswith(".zarr"):
                descend.append(name)
            elif (child / "zarr.json").is_file():
                stores.append(child)
            else:
                logger.warning(
                    "Skipping %s: it has no zarr.json, so no run store", child
                )
        dirnames[:] = descend
    return sorted(stores)


# --- identifying a run ----------------------------------------------------------


def _run_id_from_path(path: Path) -> str:
    """A run id read from a store's path, ``.../runs/<run id>.zarr``, for a store
    that cannot say its own."""
    stem = path.with_suffix("") if path.suffix == ".zarr" else path
    parts = stem.parts
    if "runs" in parts[:-1]:
        runs = len(parts) - 1 - parts[::-1].index("runs")
        return "/".join(parts[runs + 1 :])
    return stem.name


def _identify(dataset: xr.Dataset) -> dict[str, Any]:
    """The columns that say which run a store holds and how it ended."""
    attrs = dataset.attrs
    spec = run_spec(dataset)
    settings = spec.get("settings", {})
    method = attrs.get("method", spec.get("method"))
    model = settings.get("model")
    if method == "mad":
        model = " vs ".join(settings.get("metrics", []))
    row = {
        "method": method,
        "group": spec.get("group"),
        "model": model,
        "image": spec.get("image"),
        "seed": spec.get("seed"),
        "iterations": attrs.get("iterations"),
        "status": attrs.get("status"),
        "stop_reason": attrs.get("stop_reason"),
        "wall_time_s": attrs.get("wall_time_s"),
    }
    if attrs.get("run_id"):
        row["run_id"] = attrs["run_id"]
    return row


def _final_objective(dataset: xr.Dataset, method: str) -> float:
    """The number a run is summed up by: final loss (metamer), the largest final
    objective of the four directions (MAD), top eigenvalue (eigendistortion) or
    final path energy (geodesic)."""
    if method == "metamer":
        return float(np.max(_values(dataset, "final_loss")))
    if method == "mad":
        return float(np.max(_values(dataset, "objective")[-1]))
    if method == "eigendistortion":
        return float(_values(dataset.sortby("eigenindex"), "eigenvalue")[0])
    if method == "geodesic":
        return float(_values(dataset, "final_path_energy"))
    return float("nan")


def _values(dataset: xr.Dataset, name: str) -> np.ndarray:
    """A variable's values as float64, or a StoreError naming what is missing."""
    if name not in dataset.variables:
        raise StoreError(
            f"the store has no variable {name!r}, which every "
            f"{dataset.attrs.get('method', 'run')} store holds; it is damaged or "
            "was written by another version of stimsynth"
        )
    return np.asarray(dataset[name].values, dtype=np.float64)


def _describe_error(error: Exception) -> str:
    if isinstance(error, StoreError | json.JSONDecodeError):
        return str(error)
    return f"{type(error).__name__}: {error}"


# --- the checks -----------------------------------------------------------------


def _checks(dataset: xr.Dataset, method: str, limits: dict[str, Any]) -> list[_Check]:
    """Every check of a run: its format, status and finite values, then its
    method's own."""
    if method not in METHOD_CHECKS:
        known = ", ".join(METHOD_CHECKS)
        return [_Check("method", False, f"unknown method {method!r} (known: {known})")]
    checks = []
    version = dataset.attrs.get("format_version")
    if version != FORMAT_VERSION:
        checks.append(
            _Check(
                "store format",
                False,
                f"written in format version {version}, this audit reads version "
                f"{FORMAT_VERSION}; audit it with the stimsynth version that wrote it",
            )
        )
    checks.append(_status_check(dataset.attrs.get("status")))
    checks.append(_finite_check(dataset, method))
    checks.extend(METHOD_CHECKS[method](dataset, limits[method]))
    return checks


def _status_check(status: Any) -> _Check:
    if status == "converged":
        return _Check("status", True, "converged by the stop rule")
    if status == "max_iter":
        return _Check(
            "status", True, "stopped at max_iter without meeting the stop rule"
        )
    if status in FAILED_STATUSES:
        return _Check("status", False, f"the run {status} (see stop_reason)")
    expected = ", ".join(USABLE_STATUSES + FAILED_STATUSES)
    return _Check("status", False, f"unknown status {status!r} (expected {expected})")


def _finite_check(dataset: xr.Dataset, method: str) -> _Check:
    """No NaN or inf in the result variables or the per-iteration objective.

    The eigenvalue trace is NaN by design where an eigenpair is not being iterated
    (the power method finds the top eigenpairs, then the bottom ones), so there
    an iteration fails only if it estimates fewer than half the eigenpairs.
    """
    bad = []
    for name in (*RESULT_VARIABLES[method], OBJECTIVE_VARIABLES[method]):
        values = _values(dataset, name)
        if name == "eigenvalue_trace":
            values = values.reshape(len(values), -1)
            short = np.isfinite(values).sum(axis=1) < values.shape[1] / 2
            count = int(np.isinf(values).sum() + short.sum())
        else:
            count = int(np.size(values) - np.isfinite(values).sum())
        if count:
            bad.append(f"{name} ({count} values)")
    checked = ", ".join((*RESULT_VARIABLES[method], OBJECTIVE_VARIABLES[method]))
    if bad:
        return _Check("finite values", False, f"NaN or inf in {', '.join(bad)}")
    return _Check("finite values", True, f"no NaN or inf in {checked}")


def _check_metamer(dataset: xr.Dataset, limits: dict[str, float]) -> list[_Check]:
    initial = _values(dataset, "initial_loss")
    final = _values(dataset, "final_loss")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(final == 0, 0.0, final / initial)
    worst = int(np.argmax(np.nan_to_num(ratio, nan=np.inf)))
    limit = limits["max_relative_loss"]
    which = f" (worst of {ratio.size} samples)" if ratio.size > 1 else ""
    loss = _Check(
        "relative loss",
        bool(np.all(ratio < limit)),
        f"final loss is {ratio[worst]:.2e} of the initial loss{which} "
        f"(limit {limit:g})",
    )

    metamer = _values(dataset, "metamer")
    excess = float(max(0.0, -np.min(metamer), np.max(metamer) - 1.0))
    limit = limits["max_range_excess"]
    pixels = _Check(
        "pixel range",
        excess <= limit,
        f"pixels lie up to {excess:.2e} outside [0, 1] (limit {limit:g})",
    )
    return [loss, pixels]


def _check_mad(dataset: xr.Dataset, limits: dict[str, float]) -> list[_Check]:
    labels = [str(label) for label in dataset["direction"].values]
    extremum = [str(value) for value in dataset["extremum"].values]
    optimized_name = [str(value) for value in dataset["optimized_name"].values]

    metrics = run_spec(dataset).get("settings", {}).get("metrics") or sorted(
        set(optimized_name)
    )
    expected = [f"{way} {name}" for name in metrics for way in ("min", "max")]
    present = {
        f"{way} {name}" for way, name in zip(extremum, optimized_name, strict=True)
    }
    missing = [label for label in expected if label not in present]
    directions = _Check(
        "directions",
        not missing and len(expected) == 4,
        f"missing {', '.join(missing)}"
        if missing
        else f"all four present ({', '.join(expected)})",
    )

    start = _values(dataset, "optimized_metric")[0]
    final = _values(dataset, "final_optimized_metric")
    moved = np.where(np.array(extremum) == "min", final < start, final > start)
    wrong = [
        f"{label} went from {s:.3e} to {f:.3e}"
        for label, s, f, ok in zip(labels, start, final, moved, strict=True)
        if not ok
    ]
    optimized = _Check(
        "optimized metric",
        not wrong,
        f"did not move the asked way: {', '.join(wrong)}"
        if wrong
        else f"moved the asked way in all {len(labels)} directions",
    )

    reference_start = _values(dataset, "reference_metric_start")
    reference_final = _values(dataset, "final_reference_metric")
    drift = _relative_change(reference_final, reference_start)
    # The held metric must also have stayed put on the way: an image that left
    # the level set and came back may have been optimised somewhere else.
    along = _relative_change(_values(dataset, "reference_metric"), reference_start)
    along = np.nanmax(np.where(np.isnan(along), np.inf, along), axis=0)
    worst = int(np.argmax(np.nan_to_num(np.maximum(drift, along), nan=np.inf)))
    limit = limits["max_reference_drift"]
    reference = _Check(
        "reference metric drift",
        bool(np.all(drift <= limit) and np.all(along <= limit)),
        f"largest relative change {drift[worst]:.2e} at the end and "
        f"{along[worst]:.2e} along the way, in {labels[worst]!r} (limit {limit:g})",
    )
    return [directions, optimized, reference]


def _relative_change(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    """|values - start| / |start|, elementwise; 0 where nothing changed."""
    change = np.abs(values - start)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(change == 0, 0.0, change / np.abs(start))


def _check_eigendistortion(
    dataset: xr.Dataset, limits: dict[str, float]
) -> list[_Check]:
    dataset = dataset.sortby("eigenindex")
    eigenvalue = _values(dataset, "eigenvalue")
    residual = _values(dataset, "residual")
    top, bottom = eigenvalue[0], eigenvalue[-1]

    limit = limits["max_residual"]
    if top > 0:
        ratio = float(np.max(residual)) / top
        residuals = _Check(
            "eigenpair residual",
            ratio <= limit,
            f"largest residual is {ratio:.2e} of the top eigenvalue (limit {limit:g})",
        )
    else:
        residuals = _Check(
            "eigenpair residual",
            False,
            f"top eigenvalue {top:.3e} is not a positive number, so residuals "
            "cannot be judged",
        )

    order = _Check(
        "eigenvalue order",
        len(eigenvalue) < 2 or top > bottom,
        f"top eigenvalue {top:.3e}, bottom {bottom:.3e}",
    )

    distortion = _values(dataset, "eigendistortion")
    norms = np.sqrt(np.sum(distortion.reshape(len(distortion), -1) ** 2, axis=1))
    off = float(np.max(np.abs(norms - 1.0)))
    unit = _Check(
        "unit norm",
        off <= UNIT_NORM_TOLERANCE,
        f"eigendistortion norms differ from 1 by up to {off:.2e} "
        f"(tolerance {UNIT_NORM_TOLERANCE:g})",
    )
    return [residuals, order, unit, _check_eigenvalues_steady(dataset, limits)]


def _check_eigenvalues_steady(dataset: xr.Dataset, limits: dict[str, float]) -> _Check:
    """Each eigenvalue estimate held still over the last iterations of its trace.

    A small residual relative to the top eigenvalue says little about a bottom
    eigenvalue many orders of magnitude smaller; an estimate still falling is not
    found yet.
    """
    if run_spec(dataset).get("settings", {}).get("method") == "exact":
        return _Check("eigenvalues steady", True, "exact eigendecomposition")
    window = EIGENVALUE_WINDOW
    limit = limits["max_eigenvalue_change"]
    trace = _values(dataset, "eigenvalue_trace")
    labels = [int(i) for i in dataset["eigenindex"].values]
    moving = []
    worst = 0.0
    for column, index in enumerate(labels):
        estimates = trace[:, column]
        estimates = estimates[np.isfinite(estimates)]
        if len(estimates) <= window:
            moving.append(f"eigenindex {index} has only {len(estimates)} estimates")
            continue
        change = abs(estimates[-1] - estimates[-1 - window]) / abs(estimates[-1])
        worst = max(worst, change)
        if change > limit:
            moving.append(f"eigenindex {index} changed by {change:.2e}")
    detail = (
        f"still moving over the last {window} iterations: {', '.join(moving)} "
        f"(limit {limit:g})"
        if moving
        else f"largest change over the last {window} iterations {worst:.2e} "
        f"(limit {limit:g})"
    )
    return _Check("eigenvalues steady", not moving, detail)


def _check_geodesic(dataset: xr.Dataset, limits: dict[str, float]) -> list[_Check]:
    path = _values(dataset, "path")
    initial = _values(dataset, "initial_path")
    moved = [
        f"{end} frame moved by up to {np.max(np.abs(path[i] - initial[i])):.2e}"
        for end, i in (("first", 0), ("last", -1))
        if not np.array_equal(path[i], initial[i])
    ]
    endpoints = _Check(
        "endpoints",
        not moved,
        ", ".join(moved) if moved else "first and last frames equal the initial path's",
    )

    energy = float(_values(dataset, "final_path_energy"))
    fade = float(_values(dataset, "fade_path_energy"))
    limit = limits["max_energy_ratio"]
    if fade > 0:
        ratio = energy / fade
        energies = _Check(
            "energy ratio",
            ratio <= limit,
            f"path energy is {ratio:.3f} of the pixel fade's (limit {limit:g})",
        )
    else:
        energies = _Check(
            "energy ratio",
            False,
            f"the pixel fade's energy is {fade:.3e}, so the path cannot be judged "
            "by it",
        )
    return [endpoints, energies]


METHOD_CHECKS: dict[str, Callable[[xr.Dataset, dict[str, float]], list[_Check]]] = {
    "metamer": _check_metamer,
    "mad": _check_mad,
    "eigendistortion": _check_eigendistortion,
    "geodesic": _check_geodesic,
}
