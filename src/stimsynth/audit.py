"""The convergence audit: a verdict with reasons for every run store.

A run's own status says only whether its stop rule was met. The audit asks whether
its result can be used: every store gets a row with the verdict ``pass`` or
``fail``, in ``reasons`` every check that was made with its numbers and its limit,
and in ``measures`` the number each check judged, as JSON. The checks are:

- every run: the store can be read, its status is not ``diverged`` or ``failed``,
  its final results and per-iteration objective hold no NaN or inf, and it has not
  stalled (its image stopped changing while its goal is unmet);
- metamer: the final representation loss is small, both as a fraction of the
  initial loss and in the loss's own units; the objective has levelled off (its
  slope at the end is a small fraction of its mean slope over the run); no pixel
  lies far outside [0, 1]; a coarse-to-fine run reached every stage, the final
  all-scales one included;
- MAD competition: all four directions are present, each optimized metric moved
  the asked way from its start and levelled off, and each reference metric stayed
  near its start, at the end and along the way;
- eigendistortion: every eigenpair's residual ``|Fv - lambda v|`` is small relative
  to its own eigenvalue, the top eigenvalue is above the bottom one, every
  eigendistortion has unit norm, the power method's eigenvalue estimates held
  still, and the representation moves more along the top eigendistortion than
  along the bottom one by the factor ``sqrt(lambda_top / lambda_bottom)``;
- geodesic: the endpoints of the path are those it started with, its energy is at
  most a set fraction of the straight pixel fade's, its interior frames nearly
  satisfy the geodesic equation (the optimality residual), and its frames stay near
  the straight line between the endpoints in representation space.

A run that stopped at ``max_iter`` passes when its method's checks pass; its reasons
say that it stopped there. The limits come from the ``audit`` section of a study
config, whose defaults live in the config schema alone.

The audit reads each store's metadata as :func:`stimsynth.store.open_run` checks it
before opening a store, and then only the small variables its checks need, straight
from their chunks: never the snapshots, and without xarray, whose opening of a store
costs more than the whole audit of it. A store that fails those checks, whose
message names it, fails the audit as damaged.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import validate_config
from .store import FORMAT_VERSION, StoreError, read_metadata, run_spec
from .study import final_objective
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
    "failed_checks",
    "reasons",
    "measures",
    "wall_time_s",
    "store",
)

#: The ``status`` of a run whose store cannot be read.
DAMAGED = "damaged"

#: Variables holding each method's result, which must be finite.
RESULT_VARIABLES = {
    "metamer": ("metamer", "initial_loss", "final_loss"),
    "mad": ("mad_image", "final_optimized_metric", "final_reference_metric"),
    "eigendistortion": ("eigendistortion", "eigenvalue", "residual"),
    "geodesic": (
        "path",
        "step_energy",
        "final_path_energy",
        "optimality_residual",
        "deviation",
    ),
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

# An eigenvalue below this fraction of the top one is judged against this floor:
# float32 Fisher products cannot resolve it, and a model blind to a distortion
# has an eigenvalue of zero, against which no residual is small.
EIGENVALUE_FLOOR = 1e-6

# The schema requires one image; the audit section validates independently of it.
_MINIMAL_CONFIG = {"images": {"a": {"source": "plenoptic:einstein", "size": [8, 8]}}}


@dataclass(frozen=True)
class _Check:
    """One audit check: what was checked, whether it passed, its numbers, and the
    one number it judged (None when there is none)."""

    name: str
    passed: bool
    detail: str
    value: float | None = None

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
    >>> default_thresholds()["eigendistortion"]["min_sensitivity_ratio"]
    1.0
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

    A store that cannot be read gets the verdict ``fail`` and the status
    ``damaged``, with the error naming the store as its reason, so that one
    damaged store does not stop the audit of a study.

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
        every check with ``"; "``; a failed check starts with ``FAIL``, and
        ``failed_checks`` names the failed checks, joined with ``", "``.
        ``measures`` is JSON: the number each check judged, by check name.

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
        store = _RunStore(path)
    except Exception as error:
        # Reading a damaged store can fail in zarr, its codecs or the JSON of its
        # metadata in many ways; each becomes a failed row, not an aborted audit.
        reason = _damage(path, error)
        logger.warning("Cannot audit %s: %s", path, reason)
        logger.debug("Traceback of the failed audit of %s", path, exc_info=True)
        row["status"] = DAMAGED
        checks = [_Check("store", False, reason)]
    else:
        row.update(_identify(store))
        checks = _checks(store, row["method"], limits)
        row["final_objective"] = _guarded(
            lambda: final_objective(store._metadata), float("nan")
        )

    failed = [check.name for check in checks if not check.passed]
    row["verdict"] = "fail" if failed else "pass"
    row["failed_checks"] = ", ".join(dict.fromkeys(failed))
    row["reasons"] = "; ".join(check.text for check in checks)
    row["measures"] = json.dumps(
        {c.name: _rounded(c.value) for c in checks if c.value is not None}
    )
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
        logger.warning("%d of %d runs failed the audit", failed, len(table))
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

    methods = table["method"].fillna(DAMAGED)
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

    A run store is a directory whose name ends in ``.zarr``. The search does not
    descend into stores. A ``.zarr`` directory without ``zarr.json`` is listed all
    the same, so that the audit reports it as damaged rather than leave it out.

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
            if name.endswith(".zarr"):
                stores.append(Path(parent) / name)
            else:
                descend.append(name)
        dirnames[:] = descend
    return sorted(stores)


# --- reading a store ------------------------------------------------------------


class _RunStore:
    """The attributes and small variables of one run store.

    Opening checks the store's metadata as :func:`~stimsynth.store.open_run` does
    before it opens a store (:func:`~stimsynth.store.read_metadata`), and reads
    the coordinates that xarray reads on opening; a variable is read when a check
    first asks for it, straight from its chunks, and kept. Snapshots are never
    read.

    Parameters
    ----------
    path
        The store.

    Raises
    ------
    StoreError
        If the path holds no finished run store or the store is damaged; the
        message names the store.
    """

    def __init__(self, path: Path):
        self.path = path
        self._metadata = read_metadata(path)
        self.attrs = self._metadata.attrs
        self._arrays = self._metadata.arrays
        self._cache: dict[str, np.ndarray] = {}
        self.sizes: dict[str, int] = {}
        for name, meta in self._arrays.items():
            dims = meta.get("dimension_names") or ()
            self.sizes.update(zip(dims, meta["shape"], strict=False))
            if tuple(dims) == (name,):
                # xarray reads these on opening: one it cannot read is damage.
                self.raw(name)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def dims(self, name: str) -> tuple[str, ...]:
        """The dimensions of a variable."""
        return tuple(self._meta(name).get("dimension_names") or ())

    def raw(self, name: str) -> np.ndarray:
        """A variable's values as stored."""
        if name not in self._cache:
            self._meta(name)
            self._cache[name] = np.asarray(self._metadata.values(name))
        return self._cache[name]

    def values(self, name: str) -> np.ndarray:
        """A variable's values as float64."""
        return np.asarray(self.raw(name), dtype=np.float64)

    def labels(self, name: str) -> list[str]:
        """A variable of text labels as a list of str."""
        return [str(value) for value in self.raw(name).ravel()]

    def _meta(self, name: str) -> dict[str, Any]:
        if name not in self._arrays:
            raise StoreError(
                f"the store has no variable {name!r}, which the audit of a "
                f"{self.attrs.get('method', 'run')} run needs; it was written by "
                "another version of stimsynth or is damaged"
            )
        return self._arrays[name]


def _damage(path: Path, error: Exception) -> str:
    """Why a store cannot be read, naming the store."""
    message = str(error) if isinstance(error, StoreError) else _describe_error(error)
    return message if str(path) in message else f"{path}: {message}"


def _describe_error(error: Exception) -> str:
    if isinstance(error, StoreError | json.JSONDecodeError):
        return str(error)
    return f"{type(error).__name__}: {error}"


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


def _identify(store: _RunStore) -> dict[str, Any]:
    """The columns that say which run a store holds and how it ended."""
    attrs = store.attrs
    spec = _guarded(lambda: run_spec(store), {})
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


def _guarded(compute: Callable[[], Any], fallback: Any) -> Any:
    """``compute()``, or ``fallback`` where the store cannot give what it needs."""
    try:
        return compute()
    except Exception:
        return fallback


def _rounded(value: float) -> float | None:
    """A measure for the JSON of the table: 4 significant digits; NaN as null."""
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return value
    return float(f"{value:.4g}")


# --- the checks -----------------------------------------------------------------


def _checks(store: _RunStore, method: str, limits: dict[str, Any]) -> list[_Check]:
    """Every check of a run: its format, status and finite values, then its
    method's own.

    A check that cannot be made, for a variable missing or unreadable, fails
    with the error as its detail; the other checks are still made.
    """
    if method not in METHOD_CHECKS:
        known = ", ".join(METHOD_CHECKS)
        return [_Check("method", False, f"unknown method {method!r} (known: {known})")]
    checks = []
    version = store.attrs.get("format_version")
    if version != FORMAT_VERSION:
        checks.append(
            _Check(
                "store format",
                False,
                f"written in format version {version}, this audit reads version "
                f"{FORMAT_VERSION}; audit it with the stimsynth version that wrote it",
            )
        )
    checks.append(_status_check(store.attrs.get("status")))
    checks.append(_made("finite values", lambda: _finite_check(store, method)))
    for name, check in METHOD_CHECKS[method]:
        checks.append(_made(name, lambda check=check: check(store, limits[method])))
    return checks


def _made(name: str, check: Callable[[], _Check]) -> _Check:
    """A check's result, or a failed check saying why it could not be made."""
    try:
        return check()
    except Exception as error:
        logger.debug("Check %r could not be made", name, exc_info=True)
        return _Check(name, False, f"cannot be judged: {_describe_error(error)}")


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


def _finite_check(store: _RunStore, method: str) -> _Check:
    """No NaN or inf in the result variables or the per-iteration objective.

    The eigenvalue trace is NaN by design where an eigenpair is not being iterated
    (the power method finds the top eigenpairs, then the bottom ones), so there
    an iteration fails only if it estimates fewer than half the eigenpairs.
    """
    bad = []
    for name in (*RESULT_VARIABLES[method], OBJECTIVE_VARIABLES[method]):
        values = store.values(name)
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


# --- trajectories: levelling off and stalling -----------------------------------


def _per_sample(store: _RunStore, name: str) -> np.ndarray:
    """A per-iteration variable as (iteration, sample), one column for a run of
    one sample."""
    values = store.values(name)
    return values.reshape(len(values), -1)


def _stops(store: _RunStore, samples: int) -> np.ndarray:
    """Iterations each sample ran before it stopped.

    A sample that converged or diverged is frozen while the others go on, so its
    recorded trajectory ends at its stop iteration; a store without
    ``stop_iteration`` ran every sample to the end.
    """
    length = store.sizes.get("iteration", 0)
    if "stop_iteration" not in store:
        return np.full(samples, length, dtype=np.int64)
    stops = store.raw("stop_iteration").astype(np.int64).reshape(-1)
    return np.minimum(stops, length)


def _final_change(series: np.ndarray, window: int) -> float | None:
    """The share of a series' whole change that it made over its last window.

    The final change is that between the means of the last two windows of
    ``window`` values; the whole change, that from the first value to the mean of
    the last window. Means rather than single values keep the brief spikes of
    Adam from passing for a trend. A series still creeping at a slow steady rate
    makes an ever smaller share of its change at its end the longer it runs, so
    running it longer, as escalation does, brings it closer to passing.

    Returns
    -------
    share
        0 for a series flat at its end, about window / length for one that changes
        at a steady rate, inf for one that moved only at its end; None when the
        series is shorter than two windows.
    """
    if len(series) < 2 * window:
        return None
    last = series[-window:].mean()
    before = series[-2 * window : -window].mean()
    final = abs(before - last)
    whole = abs(series[0] - last)
    if final == 0:
        return 0.0
    if whole == 0:
        return math.inf
    return final / whole


def _plateau_check(
    series: np.ndarray,
    starts: np.ndarray,
    stops: np.ndarray,
    labels: list[str],
    what: str,
    limits: dict[str, float],
) -> _Check:
    """The share of its whole change that ``series`` (iteration, sample) made over
    its last window, for every sample between its start and stop iterations, is
    below the limit."""
    window, limit = limits["final_window"], limits["max_final_change"]
    ratios, short = [], []
    for column, label in enumerate(labels):
        run = series[starts[column] : stops[column], column]
        ratio = _final_change(run, window)
        if ratio is None:
            short.append(f"{label} ran {len(run)}")
        else:
            ratios.append((ratio, label))
    if short:
        return _Check(
            "plateau",
            False,
            f"cannot be judged: {', '.join(short)} iterations, fewer than two "
            f"windows of final_window={window}",
        )
    worst, label = max(ratios, key=lambda pair: np.nan_to_num(pair[0], nan=np.inf))
    where = f" (worst: {label})" if len(labels) > 1 else ""
    return _Check(
        "plateau",
        bool(worst <= limit),
        f"over the last {window} iterations the {what} made {worst:.2e} of its "
        f"whole change over the run{where} (limit {limit:g})",
        worst,
    )


def _stall_check(
    store: _RunStore,
    stops: np.ndarray,
    labels: list[str],
    unmet: list[str],
    limits: dict[str, float],
) -> _Check:
    """Whether the optimiser stopped moving the image while the goal is unmet.

    An image that no longer changes ends a trajectory that looks levelled off,
    so a stall passes the plateau check; it fails here only where the run's goal
    is unmet, since a run that reached it may rest.

    Parameters
    ----------
    stops
        Iterations each sample ran.
    labels
        Name of each sample.
    unmet
        For each sample, what of its goal is unmet, or ``""`` when it is met.
    """
    window, limit = limits["final_window"], limits["max_stalled_step"]
    steps = _per_sample(store, "pixel_change_norm")
    ratios = []
    for column in range(len(labels)):
        run = steps[: stops[column], column]
        largest = float(np.nanmax(run)) if run.size else 0.0
        last = float(np.nanmax(run[-window:])) if run.size else 0.0
        ratios.append(last / largest if largest > 0 else 0.0)
    smallest = min(ratios)
    stalled = [
        f"{label} ({ratio:.2e}), while {why}"
        for label, ratio, why in zip(labels, ratios, unmet, strict=True)
        if ratio <= limit and why
    ]
    measured = (
        f"largest image change over the last {window} iterations as a fraction "
        f"of the largest of the run"
    )
    if stalled:
        return _Check(
            "stall",
            False,
            f"the image stopped changing before the goal was reached, its "
            f"{measured} at most {limit:g}: {', '.join(stalled)}",
            smallest,
        )
    if smallest <= limit:
        return _Check(
            "stall",
            True,
            f"the image stopped changing ({measured}: {smallest:.2e}, stalled at or "
            f"below {limit:g}) once the goal was reached",
            smallest,
        )
    return _Check(
        "stall",
        True,
        f"the image still changed ({measured}: {smallest:.2e}, stalled at or below "
        f"{limit:g})",
        smallest,
    )


# --- metamer --------------------------------------------------------------------


def _metamer_loss(store: _RunStore) -> tuple[np.ndarray, np.ndarray]:
    """Final loss per sample, and its ratio to the initial loss."""
    initial = store.values("initial_loss")
    final = store.values("final_loss")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(final == 0, 0.0, final / initial)
    return final, ratio


def _sample_labels(store: _RunStore, count: int) -> list[str]:
    if "seed" in store and store.raw("seed").size == count:
        return [f"seed {int(seed)}" for seed in store.raw("seed").ravel()]
    return [f"sample {i}" for i in range(count)]


def _check_relative_loss(store: _RunStore, limits: dict[str, float]) -> _Check:
    _, ratio = _metamer_loss(store)
    worst = int(np.argmax(np.nan_to_num(ratio, nan=np.inf)))
    limit = limits["max_relative_loss"]
    which = f" (worst of {ratio.size} samples)" if ratio.size > 1 else ""
    return _Check(
        "relative loss",
        bool(np.all(ratio < limit)),
        f"final loss is {ratio[worst]:.2e} of the initial loss{which} "
        f"(limit {limit:g})",
        float(ratio[worst]),
    )


def _check_absolute_loss(store: _RunStore, limits: dict[str, float]) -> _Check:
    final, _ = _metamer_loss(store)
    worst = float(np.max(np.nan_to_num(final, nan=np.inf)))
    limit = limits["max_loss"]
    return _Check(
        "absolute loss",
        bool(np.all(final <= limit)),
        f"final loss is {worst:.2e} (limit {limit:g})",
        worst,
    )


def _check_metamer_plateau(store: _RunStore, limits: dict[str, float]) -> _Check:
    objective = _per_sample(store, "objective")
    count = objective.shape[1]
    stops = _stops(store, count)
    # A coarse-to-fine run is judged in its final, all-scales stage only: earlier
    # stages lower other objectives.
    start = _final_stage_start(store)
    starts = np.full(count, max(start, 0), dtype=np.int64)
    what = "objective" if start <= 0 else "objective of the all-scales stage"
    return _plateau_check(
        objective, starts, stops, _sample_labels(store, count), what, limits
    )


def _check_pixel_range(store: _RunStore, limits: dict[str, float]) -> _Check:
    metamer = store.values("metamer")
    excess = float(max(0.0, -np.min(metamer), np.max(metamer) - 1.0))
    limit = limits["max_range_excess"]
    return _Check(
        "pixel range",
        excess <= limit,
        f"pixels lie up to {excess:.2e} outside [0, 1] (limit {limit:g})",
        excess,
    )


def _final_stage_start(store: _RunStore) -> int:
    """The iteration at which a coarse-to-fine run's last stage began: 0 for a run
    without stages, -1 for one that never reached it."""
    if "stage_start" not in store:
        return 0
    return int(store.raw("stage_start").ravel()[-1])


def _check_coarse_to_fine(store: _RunStore, limits: dict[str, float]) -> _Check:
    if "stage_name" not in store:
        return _Check("coarse-to-fine", True, "not a coarse-to-fine run")
    names = store.labels("stage_name")
    starts = [int(start) for start in store.raw("stage_start").ravel()]
    problems = [
        f"never reached stage {name!r}"
        for name, start in zip(names, starts, strict=True)
        if start < 0
    ]
    if names[-1] != "all":
        problems.append(f"the last stage is {names[-1]!r}, not the all-scales 'all'")
    if "stage" in store and not problems:
        reached = int(np.max(store.raw("stage")))
        if reached != len(names) - 1:
            problems.append(
                f"its per-iteration stage reached index {reached} only, of "
                f"{len(names) - 1}"
            )
    iterations = store.sizes.get("iteration", 0)
    ran = iterations - starts[-1] if starts[-1] >= 0 else 0
    stages = ", ".join(
        f"{name} at {start}" if start >= 0 else f"{name} never"
        for name, start in zip(names, starts, strict=True)
    )
    if problems:
        return _Check("coarse-to-fine", False, f"{', '.join(problems)} ({stages})")
    return _Check(
        "coarse-to-fine",
        True,
        f"reached all {len(names)} stages ({stages}), the all-scales one for the "
        f"last {ran} iterations",
        float(ran),
    )


def _check_metamer_stall(store: _RunStore, limits: dict[str, float]) -> _Check:
    final, ratio = _metamer_loss(store)
    unmet = []
    for loss, relative in zip(final, ratio, strict=True):
        if not relative < limits["max_relative_loss"]:
            unmet.append(f"its loss is still {relative:.2e} of the initial loss")
        elif not loss <= limits["max_loss"]:
            unmet.append(f"its loss is still {loss:.2e}")
        else:
            unmet.append("")
    stops = _stops(store, len(final))
    return _stall_check(store, stops, _sample_labels(store, len(final)), unmet, limits)


# --- MAD competition ------------------------------------------------------------


def _mad_directions(store: _RunStore) -> tuple[list[str], np.ndarray]:
    """Each direction's label and whether it minimises its optimized metric."""
    labels = store.labels("direction")
    extremum = store.labels("extremum")
    return labels, np.array([way == "min" for way in extremum])


def _check_mad_directions(store: _RunStore, limits: dict[str, float]) -> _Check:
    labels = store.labels("direction")
    extremum = store.labels("extremum")
    optimized = store.labels("optimized_name")
    metrics = run_spec(store).get("settings", {}).get("metrics") or sorted(
        set(optimized)
    )
    expected = [f"{way} {name}" for name in metrics for way in ("min", "max")]
    # The labels must say what each direction did, not only be the right words.
    implied = [f"{way} {name}" for way, name in zip(extremum, optimized, strict=True)]
    problems = []
    missing = [label for label in expected if label not in implied]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if len(labels) != 4 or len(expected) != 4:
        problems.append(f"{len(labels)} directions, not 4")
    mislabelled = [
        f"{label!r} holds {what!r}"
        for label, what in zip(labels, implied, strict=True)
        if label != what
    ]
    if mislabelled:
        problems.append(f"mislabelled: {', '.join(mislabelled)}")
    if problems:
        return _Check("directions", False, ", ".join(problems))
    return _Check("directions", True, f"all four present ({', '.join(expected)})")


def _check_mad_optimized(store: _RunStore, limits: dict[str, float]) -> _Check:
    labels, minimise = _mad_directions(store)
    start = _per_sample(store, "optimized_metric")[0]
    final = store.values("final_optimized_metric")
    moved = np.where(minimise, final < start, final > start)
    wrong = [
        f"{label} went from {s:.3e} to {f:.3e}"
        for label, s, f, ok in zip(labels, start, final, moved, strict=True)
        if not ok
    ]
    return _Check(
        "optimized metric",
        not wrong,
        f"did not move the asked way: {', '.join(wrong)}"
        if wrong
        else f"moved the asked way in all {len(labels)} directions",
    )


def _check_mad_plateau(store: _RunStore, limits: dict[str, float]) -> _Check:
    labels, _ = _mad_directions(store)
    metric = _per_sample(store, "optimized_metric")
    stops = _stops(store, len(labels))
    starts = np.zeros(len(labels), dtype=np.int64)
    return _plateau_check(metric, starts, stops, labels, "optimized metric", limits)


def _check_mad_reference(store: _RunStore, limits: dict[str, float]) -> _Check:
    labels, _ = _mad_directions(store)
    reference_start = store.values("reference_metric_start")
    reference_final = store.values("final_reference_metric")
    drift = _relative_change(reference_final, reference_start)
    # The held metric must also have stayed put on the way: an image that left
    # the level set and came back may have been optimised somewhere else.
    along = _relative_change(_per_sample(store, "reference_metric"), reference_start)
    along = np.nanmax(np.where(np.isnan(along), np.inf, along), axis=0)
    worst = int(np.argmax(np.nan_to_num(np.maximum(drift, along), nan=np.inf)))
    limit = limits["max_reference_drift"]
    return _Check(
        "reference metric drift",
        bool(np.all(drift <= limit) and np.all(along <= limit)),
        f"largest relative change {drift[worst]:.2e} at the end and "
        f"{along[worst]:.2e} along the way, in {labels[worst]!r} (limit {limit:g})",
        float(max(drift[worst], along[worst])),
    )


def _check_mad_stall(store: _RunStore, limits: dict[str, float]) -> _Check:
    labels, minimise = _mad_directions(store)
    start = _per_sample(store, "optimized_metric")[0]
    final = store.values("final_optimized_metric")
    moved = np.where(minimise, final < start, final > start)
    unmet = [
        "" if ok else "its optimized metric has not moved the asked way" for ok in moved
    ]
    return _stall_check(store, _stops(store, len(labels)), labels, unmet, limits)


def _relative_change(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    """|values - start| / |start|, elementwise; 0 where nothing changed."""
    change = np.abs(values - start)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(change == 0, 0.0, change / np.abs(start))


# --- eigendistortion ------------------------------------------------------------


def _eigenindex(store: _RunStore) -> np.ndarray:
    return store.raw("eigenindex").astype(np.int64).ravel()


def _eigenpairs(store: _RunStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenindices, eigenvalues and residuals, top first."""
    index = _eigenindex(store)
    order = np.argsort(index)
    return (
        index[order],
        store.values("eigenvalue")[order],
        store.values("residual")[order],
    )


def _check_eigen_residual(store: _RunStore, limits: dict[str, float]) -> _Check:
    index, eigenvalue, residual = _eigenpairs(store)
    top = eigenvalue[0]
    limit = limits["max_relative_residual"]
    if not top > 0:
        return _Check(
            "eigenpair residual",
            False,
            f"top eigenvalue {top:.3e} is not a positive number, so residuals "
            "cannot be judged",
        )
    floor = EIGENVALUE_FLOOR * top
    scale = np.maximum(eigenvalue, floor)
    relative = residual / scale
    worst = int(np.argmax(np.nan_to_num(relative, nan=np.inf)))
    floored = (
        f", judged against {EIGENVALUE_FLOOR:g} x the top eigenvalue, its own "
        f"being {eigenvalue[worst]:.2e}"
        if eigenvalue[worst] < floor
        else ""
    )
    return _Check(
        "eigenpair residual",
        bool(np.all(relative <= limit)),
        f"largest |Fv - lambda v| / lambda is {relative[worst]:.2e}, for "
        f"eigenindex {index[worst]}{floored} (limit {limit:g})",
        float(relative[worst]),
    )


def _check_eigen_order(store: _RunStore, limits: dict[str, float]) -> _Check:
    _, eigenvalue, _ = _eigenpairs(store)
    top, bottom = eigenvalue[0], eigenvalue[-1]
    return _Check(
        "eigenvalue order",
        bool(len(eigenvalue) < 2 or top > bottom),
        f"top eigenvalue {top:.3e}, bottom {bottom:.3e}",
    )


def _check_unit_norm(store: _RunStore, limits: dict[str, float]) -> _Check:
    distortion = store.values("eigendistortion")
    norms = np.sqrt(np.sum(distortion.reshape(len(distortion), -1) ** 2, axis=1))
    off = float(np.max(np.abs(norms - 1.0)))
    return _Check(
        "unit norm",
        off <= UNIT_NORM_TOLERANCE,
        f"eigendistortion norms differ from 1 by up to {off:.2e} "
        f"(tolerance {UNIT_NORM_TOLERANCE:g})",
        off,
    )


def _check_eigenvalues_steady(store: _RunStore, limits: dict[str, float]) -> _Check:
    """Each power-method eigenvalue estimate held still over the last iterations
    of its trace.

    The power method finds the bottom of the spectrum slowly, and an estimate
    still falling is not found yet. The other methods judge their eigenvalues by
    error bounds, so their traces are not judged here.
    """
    method = run_spec(store).get("settings", {}).get("method", "power")
    if method != "power":
        return _Check("eigenvalues steady", True, f"not judged for method {method!r}")
    window = EIGENVALUE_WINDOW
    limit = limits["max_eigenvalue_change"]
    trace = store.values("eigenvalue_trace").reshape(
        store.sizes.get("iteration", 0), -1
    )
    labels = [int(i) for i in _eigenindex(store)]
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
    return _Check("eigenvalues steady", not moving, detail, worst)


def _check_sensitivity(store: _RunStore, limits: dict[str, float]) -> _Check:
    """How much more the representation moves along the top eigendistortion than
    along the bottom one, at the same amplitude.

    A unit distortion ``v`` changes the representation by ``sqrt(v^T F v)``, which
    is ``sqrt(lambda)`` for an eigendistortion; at any display amplitude the ratio
    of the two changes is therefore ``sqrt(lambda_top / lambda_bottom)``.
    """
    _, eigenvalue, _ = _eigenpairs(store)
    top, bottom = eigenvalue[0], eigenvalue[-1]
    limit = limits["min_sensitivity_ratio"]
    if not top > 0:
        return _Check(
            "sensitivity ratio",
            False,
            f"top eigenvalue {top:.3e} is not positive: the model does not respond "
            "to the top eigendistortion",
        )
    ratio = math.sqrt(top / bottom) if bottom > 0 else math.inf
    return _Check(
        "sensitivity ratio",
        bool(ratio > limit),
        f"the representation moves {ratio:.3g} times more along the top "
        f"eigendistortion than along the bottom one, sqrt({top:.3e} / "
        f"{bottom:.3e}) (must exceed {limit:g})",
        ratio,
    )


# --- geodesic -------------------------------------------------------------------


def _check_endpoints(store: _RunStore, limits: dict[str, float]) -> _Check:
    path = store.raw("path")
    initial = store.raw("initial_path")
    moved = [
        f"{end} frame moved by up to "
        f"{np.max(np.abs(path[i].astype(np.float64) - initial[i])):.2e}"
        for end, i in (("first", 0), ("last", -1))
        if not np.array_equal(path[i], initial[i])
    ]
    return _Check(
        "endpoints",
        not moved,
        ", ".join(moved) if moved else "first and last frames equal the initial path's",
    )


def _check_energy(store: _RunStore, limits: dict[str, float]) -> _Check:
    energy = float(store.values("final_path_energy"))
    fade = float(store.values("fade_path_energy"))
    limit = limits["max_energy_ratio"]
    if not fade > 0:
        return _Check(
            "energy ratio",
            False,
            f"the pixel fade's energy is {fade:.3e}, so the path cannot be judged "
            "by it",
        )
    ratio = energy / fade
    return _Check(
        "energy ratio",
        bool(ratio <= limit),
        f"path energy is {ratio:.3f} of the pixel fade's (limit {limit:g})",
        ratio,
    )


def _worst_frame(store: _RunStore, name: str) -> tuple[float, int, float]:
    """The largest value of a per-frame variable, its frame, and the fade's
    largest value of the same."""
    values = store.values(name)
    frames = store.raw(store.dims(name)[0]) if store.dims(name)[0] in store else None
    worst = int(np.argmax(np.nan_to_num(values, nan=np.inf)))
    frame = int(frames[worst]) if frames is not None else worst
    fade = store.values(f"fade_{name}")
    return float(values[worst]), frame, float(np.nanmax(fade))


def _check_optimality(store: _RunStore, limits: dict[str, float]) -> _Check:
    residual, step, fade = _worst_frame(store, "optimality_residual")
    limit = limits["max_optimality_residual"]
    return _Check(
        "optimality residual",
        bool(residual <= limit),
        f"largest optimality residual is {residual:.3g}, at step {step} (pixel "
        f"fade: {fade:.3g}, limit {limit:g})",
        residual,
    )


def _check_deviation(store: _RunStore, limits: dict[str, float]) -> _Check:
    deviation, step, fade = _worst_frame(store, "deviation")
    limit = limits["max_deviation"]
    return _Check(
        "deviation",
        bool(deviation <= limit),
        f"frames lie up to {deviation:.3g} of the endpoint distance off the straight "
        f"line in representation space, at step {step} (pixel fade: {fade:.3g}, "
        f"limit {limit:g})",
        deviation,
    )


def _check_geodesic_stall(store: _RunStore, limits: dict[str, float]) -> _Check:
    residual, _, _ = _worst_frame(store, "optimality_residual")
    unmet = (
        ""
        if residual <= limits["max_optimality_residual"]
        else f"its optimality residual is still {residual:.3g}"
    )
    stops = np.array([store.sizes.get("iteration", 0)])
    return _stall_check(store, stops, ["path"], [unmet], limits)


#: The checks of each method, by name, in the order they are reported.
METHOD_CHECKS: dict[
    str, list[tuple[str, Callable[[_RunStore, dict[str, float]], _Check]]]
] = {
    "metamer": [
        ("relative loss", _check_relative_loss),
        ("absolute loss", _check_absolute_loss),
        ("plateau", _check_metamer_plateau),
        ("pixel range", _check_pixel_range),
        ("coarse-to-fine", _check_coarse_to_fine),
        ("stall", _check_metamer_stall),
    ],
    "mad": [
        ("directions", _check_mad_directions),
        ("optimized metric", _check_mad_optimized),
        ("plateau", _check_mad_plateau),
        ("reference metric drift", _check_mad_reference),
        ("stall", _check_mad_stall),
    ],
    "eigendistortion": [
        ("eigenpair residual", _check_eigen_residual),
        ("eigenvalue order", _check_eigen_order),
        ("unit norm", _check_unit_norm),
        ("eigenvalues steady", _check_eigenvalues_steady),
        ("sensitivity ratio", _check_sensitivity),
    ],
    "geodesic": [
        ("endpoints", _check_endpoints),
        ("energy ratio", _check_energy),
        ("optimality residual", _check_optimality),
        ("deviation", _check_deviation),
        ("stall", _check_geodesic_stall),
    ],
}
