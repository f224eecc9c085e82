"""Run stores: one Zarr store per run, written through xarray, read with plain xarray.

A store holds one run's whole trajectory. Its layout:

- dimension ``iteration``: per-iteration scalars (objective, its parts, gradient
  norm, pixel change norm, learning rate; eigenvalue estimates and residuals for an
  eigendistortion), each also along the run's sample dimension when it has one;
- dimension ``snapshot`` with coordinate ``snapshot_iteration``: copies of the
  image(s) being synthesised every few iterations;
- the sample dimension of the method: ``sample`` (one per seed) for metamers,
  ``direction`` for MAD, ``eigenindex`` for eigendistortions, ``step`` (frames of the
  path) for geodesics; and ``channel``, ``y``, ``x`` for images;
- final variables without ``iteration``: the result, the target or reference
  images, and what the method is judged by;
- attributes: ``method``, ``run_id``, ``spec`` (the full run spec as JSON),
  ``spec_hash``, ``config_hash``, ``versions`` (JSON), ``git_commit``, ``device``,
  ``dtype``, ``started``, ``finished``, ``wall_time_s``, ``status``, ``stop_reason``,
  ``iterations``, and ``format_version``.

The trajectory is streamed: scalars and snapshots are buffered in memory and
appended every ``flush_every`` iterations, so memory does not grow with the run.
Appends go to a partial store outside the run's published path, consolidated
metadata is written once at the end, and :func:`publish` moves the finished store
into place with one rename, so a store at its published path is always complete.

Reading checks before it trusts: :func:`open_run` (and :func:`read_metadata`, which
reads metadata alone) refuses a store whose metadata, attributes or expected
variables are damaged with a :class:`DamagedStoreError` that names the store and
the variable, and warns with a :class:`StoreVersionWarning` when the store was
written by another version of stimsynth, torch or plenoptic or in an older format.
:func:`verify_run` also reads every chunk. A store needs none of this to be read:
``xarray.open_zarr(path)`` opens it without stimsynth.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import xarray as xr
import zarr

from . import __version__
from .checkpoint import CHECKPOINT_EVERY, fault_point
from .errors import InputError

logger = logging.getLogger(__name__)

#: Version of the store layout; a reader compares it with its own.
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """A run store is missing, incomplete or damaged."""


class StoreWriteError(StoreError, InputError):
    """A run store cannot be written (a full disk, no permission, a path that is
    not a folder); the message says where and why.

    It is for the user to fix, not a bug, so jobs report it without a traceback.
    """


def _write_errors(what: str, path_of: Callable[..., Any]):
    """Turn the OSError of a write into a StoreWriteError naming the store.

    Parameters
    ----------
    what
        What was being written, e.g. ``partial run store``.
    path_of
        Given the decorated function's arguments, the store's path.
    """

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except OSError as error:
                path = path_of(*args, **kwargs)
                reason = error.strerror or str(error) or type(error).__name__
                at = f" (at {error.filename})" if error.filename else ""
                raise StoreWriteError(
                    f"cannot write the {what} {path}: {reason}{at}; free space or "
                    "fix permissions there, or set results to a folder that can be "
                    "written, then run the study again"
                ) from error

        return wrapper

    return decorate


class RunWriter:
    """Streams one run's trajectory into a Zarr store.

    Parameters
    ----------
    path
        Where the store is written while the run goes (the partial store).
    sample_dim
        Name of the sample dimension of per-iteration arrays and snapshots, or None
        for a run whose scalars are single values.
    sample_coords
        Coordinates of the sample dimension (e.g. ``{"seed": [0, 1]}``).
    snapshot_name
        Name of the snapshot variable, such as ``metamer_snapshot``.
    snapshot_dims
        Dimensions of one snapshot after the sample dimension.
    flush_every
        Iterations buffered in memory between appends, and the chunk length
        along ``iteration``.
    resume
        Lengths (``iteration``, ``snapshot``) of an existing partial store, already
        cut back to them with :func:`cut_store`, to append after; None starts a
        new store, removing a stale one.
    """

    @_write_errors("partial run store", lambda self, *a, **k: self.path)
    def __init__(
        self,
        path: str | os.PathLike,
        sample_dim: str | None,
        sample_coords: dict[str, Any] | None = None,
        snapshot_name: str = "snapshot_image",
        snapshot_dims: tuple[str, ...] = ("channel", "y", "x"),
        flush_every: int = CHECKPOINT_EVERY,
        resume: dict[str, int] | None = None,
    ):
        self.path = Path(path)
        self._sample_dim = sample_dim
        self._sample_coords = sample_coords or {}
        self._snapshot_name = snapshot_name
        self._snapshot_dims = snapshot_dims
        self._flush_every = flush_every
        self._rows: list[tuple[int, dict[str, np.ndarray]]] = []
        self._snapshots: list[tuple[int, np.ndarray]] = []
        self._lengths = {"iteration": 0, "snapshot": 0}
        if resume is not None and self.path.exists():
            # The caller cut the store back to these lengths (cut_store) when it
            # decided the run could resume.
            self._lengths = dict(resume)
        elif self.path.exists():
            logger.warning("Removing a stale partial store at %s", self.path)
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def lengths(self) -> dict[str, int]:
        """Iterations and snapshots appended to the store so far."""
        return dict(self._lengths)

    def record(self, iteration: int, scalars: dict[str, np.ndarray]) -> None:
        """Buffer one iteration's scalars; append when the buffer is full."""
        self._rows.append((iteration, scalars))
        if len(self._rows) >= self._flush_every:
            self.flush()

    def snapshot(self, iteration: int, image: np.ndarray) -> None:
        """Buffer one snapshot, shape (samples, *snapshot_dims)."""
        self._snapshots.append((iteration, np.array(image, dtype=np.float32)))

    @_write_errors("partial run store", lambda self, *a, **k: self.path)
    def flush(self) -> None:
        """Append everything buffered to the store."""
        if self._rows:
            self._append(self._scalars_dataset(), "iteration", len(self._rows))
            self._rows = []
            fault_point("flush")
        if self._snapshots:
            self._append(self._snapshot_dataset(), "snapshot", len(self._snapshots))
            self._snapshots = []

    @_write_errors("partial run store", lambda self, *a, **k: self.path)
    def finish(self, final: xr.Dataset, attrs: dict[str, Any]) -> None:
        """Write the final variables and the attributes, then consolidate metadata.

        Attributes are written last, straight into the Zarr group, because xarray
        appends replace a store's attributes with those of the appended dataset.
        """
        self.flush()
        final.to_zarr(self.path, mode="a", consolidated=False)
        group = zarr.open_group(self.path, mode="r+")
        group.attrs.update(_jsonable(attrs))
        with warnings.catch_warnings():
            # Consolidated metadata is a zarr-python extension of Zarr 3 that xarray
            # reads; a store opens without it too, only more slowly.
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
            zarr.consolidate_metadata(self.path)

    def _scalars_dataset(self) -> xr.Dataset:
        iterations = np.array([i for i, _ in self._rows], dtype=np.int64)
        names = self._rows[0][1].keys()
        data_vars = {}
        for name in names:
            values = np.stack([np.asarray(row[name]) for _, row in self._rows])
            if self._sample_dim is None:
                # A run of one sample keeps plain per-iteration series.
                values = values.reshape(len(values), -1)[:, 0]
            dims = (
                ("iteration",) if values.ndim == 1 else ("iteration", self._sample_dim)
            )
            data_vars[name] = (dims, values)
        coords = {"iteration": iterations}
        if self._sample_dim is not None:
            coords.update(self._sample_coords)
        return xr.Dataset(data_vars, coords=coords)

    def _snapshot_dataset(self) -> xr.Dataset:
        images = np.stack([image for _, image in self._snapshots])
        iterations = np.array([i for i, _ in self._snapshots], dtype=np.int64)
        if self._sample_dim is None:
            images = images[:, 0]
            dims = ("snapshot", *self._snapshot_dims)
        else:
            dims = ("snapshot", self._sample_dim, *self._snapshot_dims)
        return xr.Dataset(
            {self._snapshot_name: (dims, images)},
            coords={"snapshot_iteration": ("snapshot", iterations)},
        )

    def _append(self, dataset: xr.Dataset, dim: str, count: int) -> None:
        if self._lengths[dim]:
            dataset.to_zarr(self.path, append_dim=dim, consolidated=False)
        else:
            # Chunks of one flush's length: each append then writes whole new
            # chunks and never rewrites one that a checkpoint counts on.
            along = self._flush_every if dim == "iteration" else 1
            encoding = {
                name: {"chunks": _chunks(var, dim, along)}
                for name, var in dataset.variables.items()
                if dim in var.dims
            }
            mode = "a" if (self.path / "zarr.json").exists() else "w"
            dataset.to_zarr(self.path, mode=mode, encoding=encoding, consolidated=False)
        self._lengths[dim] += count


def _chunks(var: xr.Variable, dim: str, along: int) -> tuple[int, ...]:
    """Chunk shape: ``along`` entries of ``dim``, whole along the others."""
    return tuple(
        along if d == dim else size for d, size in zip(var.dims, var.shape, strict=True)
    )


def cut_store(path: str | os.PathLike, lengths: dict[str, int]) -> None:
    """Cut every array of a partial store back to ``lengths`` along its dimension.

    An append touches several arrays and is not atomic as a whole: a run killed
    in the middle leaves some arrays longer than others, which xarray refuses to
    open. Cutting each back to the lengths a checkpoint recorded restores the
    store as it was at that checkpoint.
    """
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for name, array in group.arrays():
        dims = array.metadata.dimension_names or ()
        for dim, length in lengths.items():
            if not dims or dims[0] != dim or array.shape[0] == length:
                continue
            logger.info(
                "Cutting %s of %s from %d to %d", name, path, array.shape[0], length
            )
            if length == 0:
                # Nothing of it was counted on: the next append creates it anew.
                del group[name]
            else:
                array.resize((length, *array.shape[1:]))


@_write_errors("run store", lambda partial, final: final)
def publish(partial: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a finished store to its published path with one rename.

    Parameters
    ----------
    partial
        The finished store.
    final
        Its published path; must not exist yet.

    Returns
    -------
    path
        The published path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.replaced")
    if final.exists():
        # Moved aside rather than deleted in place: a reader at this moment sees
        # the old store whole or the new one, never half of either.
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(partial, final)
    if old.exists():
        shutil.rmtree(old)
    logger.info("Published %s", final)
    return final


class NotARunError(StoreError):
    """A path holds no run store: no Zarr store at all, or a prepared image."""


class DamagedStoreError(StoreError):
    """A run store is damaged: unreadable metadata or chunks, a missing variable or
    attribute, or a run that never finished.

    Attributes
    ----------
    path : pathlib.Path
        The store.
    variable : str or None
        The damaged or missing variable, when the damage lies in one.
    """

    def __init__(self, path: Path, problem: str, variable: str | None = None):
        super().__init__(f"{path} is damaged: {problem}")
        self.path = path
        self.variable = variable
        self.problem = problem


class StoreVersionWarning(UserWarning):
    """A run store was written by another version of stimsynth, torch or plenoptic
    than the one reading it, or in an older store format.

    Its numbers may differ from what the running versions compute, and an older
    format may lack variables or attributes that this version writes.

    Attributes
    ----------
    path : pathlib.Path
        The store.
    differences : dict
        ``{name: (written, running)}`` for each package in
        :data:`COMPARED_PACKAGES` whose version differs (``written`` is None when
        the store does not say), and ``"format_version"`` when the format differs.
    """

    def __init__(self, message: str, path: Path, differences: dict):
        super().__init__(message)
        self.path = path
        self.differences = differences


#: Packages whose version shapes a run's numbers; a store written under another
#: version of any of them opens with a :class:`StoreVersionWarning`.
COMPARED_PACKAGES = ("stimsynth", "torch", "plenoptic")

#: Attributes every finished run store holds. Others (``config_hash``,
#: ``git_commit``, ``device``, ``dtype``, ``started``, ``finished``,
#: ``wall_time_s``, ``resumed_at``) are read when present: stores written before
#: one of them was added still open.
REQUIRED_ATTRS = (
    "format_version",
    "method",
    "run_id",
    "spec",
    "versions",
    "status",
    "stop_reason",
    "iterations",
)

_OPTIMIZATION_TRACES = (
    "objective",
    "penalty",
    "gradient_norm",
    "pixel_change_norm",
    "learning_rate",
)

#: Variables every finished store of a method holds. Snapshots are not among them:
#: a run with ``snapshot_every: 0`` keeps none.
EXPECTED_VARIABLES = {
    "metamer": (
        *_OPTIMIZATION_TRACES,
        "loss",
        "metamer",
        "initial_image",
        "target_image",
        "initial_loss",
        "final_loss",
    ),
    "mad": (
        *_OPTIMIZATION_TRACES,
        "optimized_metric",
        "reference_metric",
        "mad_image",
        "initial_image",
        "reference_image",
        "final_optimized_metric",
        "final_reference_metric",
        "reference_metric_start",
        "tradeoff",
    ),
    "eigendistortion": (
        "eigenvalue_trace",
        "residual_trace",
        "eigenvalue",
        "eigendistortion",
        "residual",
        "image",
    ),
    "geodesic": (
        *_OPTIMIZATION_TRACES,
        "path_energy",
        "path",
        "initial_path",
        "step_energy",
        "fade_step_energy",
        "deviation",
        "fade_deviation",
        "final_path_energy",
        "fade_path_energy",
    ),
}

# Statuses of runs whose results may hold nothing but NaN. Zarr writes no chunk
# that holds only the fill value (NaN for floats), so such a run's store may lack
# chunk files that a finished run's store always has.
_NAN_STATUSES = ("diverged", "failed")

# Arrays up to this size are read whole by verify_run; larger ones a row of chunks
# at a time, so that verifying a long run does not load its snapshots at once.
_VERIFY_READ_BYTES = 64 * 2**20


@dataclass(frozen=True)
class StoreMetadata:
    """What a run store says about itself, read from its metadata files alone.

    Made by :func:`read_metadata`, which has checked it. Reading it costs a few
    small JSON files, no chunk and no xarray.

    Attributes
    ----------
    path : pathlib.Path
        The store.
    attrs : dict
        The store's attributes, as written (``spec`` and ``versions`` are JSON).
    arrays : dict
        Zarr metadata of each variable and coordinate, by name.
    """

    path: Path
    attrs: dict[str, Any]
    arrays: dict[str, dict[str, Any]]

    @property
    def method(self) -> str:
        """The run's method: ``metamer``, ``mad``, ``eigendistortion``, ``geodesic``."""
        return self.attrs["method"]

    def spec(self) -> dict[str, Any]:
        """The full run spec the store was written from."""
        return json.loads(self.attrs["spec"])

    def versions(self) -> dict[str, str]:
        """Versions of the software that wrote the store, by package."""
        return json.loads(self.attrs["versions"])

    def values(self, name: str) -> np.ndarray:
        """All values of a small variable (a final result), read from its chunks.

        Raises
        ------
        DamagedStoreError
            If the variable is missing or a chunk of it cannot be decoded.
        """
        meta = self._array(name)
        return self._region(name, meta, [range(n) for n in _chunk_grid(meta)])

    def last(self, name: str) -> np.ndarray:
        """The last entry of a variable along its first dimension (e.g. the last
        iteration of a trajectory), reading only the chunks that hold it.

        Raises
        ------
        DamagedStoreError
            If the variable is missing or empty, or a chunk of it cannot be decoded.
        """
        meta = self._array(name)
        shape = meta["shape"]
        if not shape or shape[0] == 0:
            raise DamagedStoreError(self.path, f"variable {name!r} is empty", name)
        row = (shape[0] - 1) // _chunk_shape(meta)[0]
        ranges = [range(row, row + 1), *(range(n) for n in _chunk_grid(meta)[1:])]
        return self._region(name, meta, ranges)[-1]

    def _region(
        self, name: str, meta: dict[str, Any], ranges: list[range]
    ) -> np.ndarray:
        """The values held by a box of chunks, given by a range of chunk indices
        along each dimension."""
        chunk, shape = _chunk_shape(meta), meta["shape"]
        starts = [r.start * c for r, c in zip(ranges, chunk, strict=True)]
        stops = [
            min(r.stop * c, s) for r, c, s in zip(ranges, chunk, shape, strict=True)
        ]
        box = [b - a for a, b in zip(starts, stops, strict=True)]
        out = None
        for coords in itertools.product(*ranges):
            block = self._block(name, meta, coords)
            if out is None:
                out = np.empty(box, dtype=block.dtype)
            where = tuple(
                slice(i * c - a, i * c - a + n)
                for i, c, a, n in zip(coords, chunk, starts, block.shape, strict=True)
            )
            out[where] = block
        # An array with a dimension of length 0 has no chunks.
        return out if out is not None else np.empty(box)

    def _array(self, name: str) -> dict[str, Any]:
        if name not in self.arrays:
            raise DamagedStoreError(
                self.path, f"it has no variable {name!r}", variable=name
            )
        return self.arrays[name]

    def _block(
        self, name: str, meta: dict[str, Any], coords: tuple[int, ...]
    ) -> np.ndarray:
        """One chunk, cut to the part inside the array."""
        try:
            return _read_chunk(self.path / name, meta, coords)
        except DamagedStoreError:
            raise
        except Exception as error:  # noqa: BLE001 - codecs raise many kinds here
            raise DamagedStoreError(
                self.path,
                f"chunk {coords} of variable {name!r} cannot be read "
                f"({type(error).__name__}: {error})",
                variable=name,
            ) from error


def read_metadata(path: str | os.PathLike) -> StoreMetadata:
    """Read and check a published run store's metadata, without reading any chunk.

    Checks that the store has its consolidated metadata and every attribute in
    :data:`REQUIRED_ATTRS`, that its format is one this version reads, that every
    variable's own metadata file is valid and agrees with the consolidated copy,
    that variables agree on the length of each dimension, and that every variable
    in :data:`EXPECTED_VARIABLES` for its method is there.

    Parameters
    ----------
    path
        The store's directory.

    Returns
    -------
    metadata
        Attributes and array metadata of the store.

    Raises
    ------
    NotARunError
        If the path holds no store, or a prepared image rather than a run.
    StoreError
        If the store is in a newer format than this version reads.
    DamagedStoreError
        If the store is damaged or never finished; the message names the store
        and, where there is one, the damaged variable.
    """
    path = Path(path)
    root = path / "zarr.json"
    if not root.is_file():
        raise NotARunError(f"{path} is not a run store (no zarr.json)")
    try:
        group = json.loads(root.read_bytes())
    except (OSError, ValueError) as error:
        raise DamagedStoreError(
            path,
            "it could not be opened as a run store: its zarr.json is not valid "
            f"JSON ({error})",
        ) from error
    if not isinstance(group, dict) or group.get("node_type") != "group":
        raise DamagedStoreError(
            path,
            "it could not be opened as a run store: its zarr.json does not "
            "describe a Zarr group",
        )
    attrs = group.get("attributes") or {}
    consolidated = (group.get("consolidated_metadata") or {}).get("metadata")
    if "status" not in attrs:
        if "run_id" not in attrs and "image" in (consolidated or {}):
            raise NotARunError(f"{path} holds a prepared image, not a run")
        raise DamagedStoreError(
            path, "it has no outcome (status): the run that wrote it never finished"
        )
    if consolidated is None:
        raise DamagedStoreError(
            path,
            "its zarr.json has lost the consolidated metadata every finished run "
            "store has; if verify_run finds its arrays intact, "
            "zarr.consolidate_metadata(path) restores it",
        )
    _check_attrs(path, attrs)
    arrays = {
        name: meta
        for name, meta in consolidated.items()
        if "/" not in name and meta.get("node_type") == "array"
    }
    _check_arrays(path, arrays)
    missing = [
        name
        for name in EXPECTED_VARIABLES.get(attrs["method"], ())
        if name not in arrays
    ]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        raise DamagedStoreError(
            path,
            f"it has no variable {names}, which every {attrs['method']} store "
            "holds (a deleted array, or a store written by another program)",
            variable=missing[0],
        )
    return StoreMetadata(path, attrs, arrays)


def _check_attrs(path: Path, attrs: dict[str, Any]) -> None:
    missing = [name for name in REQUIRED_ATTRS if name not in attrs]
    if missing:
        raise DamagedStoreError(path, f"it lacks the attribute(s) {', '.join(missing)}")
    try:
        version = int(attrs["format_version"])
    except (TypeError, ValueError):
        raise DamagedStoreError(
            path, f"its format_version {attrs['format_version']!r} is not a number"
        ) from None
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} is in store format {version}, newer than format "
            f"{FORMAT_VERSION} that this stimsynth ({__version__}) reads; read it "
            "with the stimsynth that wrote it, "
            f"{_versions_text(attrs.get('versions'))}, or a newer one"
        )
    for name in ("spec", "versions"):
        try:
            value = json.loads(attrs[name])
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, dict):
            raise DamagedStoreError(path, f"its attribute {name} is not a JSON object")


def _check_arrays(path: Path, arrays: dict[str, dict[str, Any]]) -> None:
    """Every array's own metadata file is there, valid and as consolidated, and
    arrays agree on dimension lengths."""
    lengths: dict[str, tuple[str, int]] = {}
    for name, meta in sorted(arrays.items()):
        own = path / name / "zarr.json"
        try:
            written = json.loads(own.read_bytes())
        except FileNotFoundError:
            raise DamagedStoreError(
                path, f"variable {name!r} is missing (no {name}/zarr.json)", name
            ) from None
        except (OSError, ValueError) as error:
            raise DamagedStoreError(
                path,
                f"the metadata of variable {name!r} is not valid JSON ({error})",
                name,
            ) from error
        if not isinstance(written, dict) or written.get("shape") != meta.get("shape"):
            shape = written.get("shape") if isinstance(written, dict) else None
            raise DamagedStoreError(
                path,
                f"variable {name!r} has shape {shape} in its own metadata but "
                f"{meta.get('shape')} in the consolidated metadata",
                name,
            )
        for dim, size in zip(
            meta.get("dimension_names") or (), meta["shape"], strict=False
        ):
            first, known = lengths.setdefault(dim, (name, size))
            if known != size:
                raise DamagedStoreError(
                    path,
                    f"variables disagree on the length of dimension {dim!r}: "
                    f"{first!r} has {known}, {name!r} has {size}",
                    name,
                )


@functools.cache
def running_versions() -> dict[str, str]:
    """Versions of the packages in :data:`COMPARED_PACKAGES` in this process.

    Taken as :func:`stimsynth.runner.versions` records them, without importing
    plenoptic when it is not imported yet. Looked up once per process: a package's
    metadata takes about a millisecond to read, which a study of a thousand runs
    would otherwise pay a thousand times. Do not change the returned dict.
    """
    plenoptic = sys.modules.get("plenoptic")
    try:
        plenoptic_version = (
            plenoptic.__version__
            if plenoptic
            else importlib.metadata.version("plenoptic")
        )
    except importlib.metadata.PackageNotFoundError:
        plenoptic_version = "not installed"
    return {
        "stimsynth": __version__,
        "torch": torch.__version__,
        "plenoptic": plenoptic_version,
    }


def version_differences(attrs: dict[str, Any]) -> dict[str, tuple[str | None, str]]:
    """How the software that wrote a store differs from the running one.

    Parameters
    ----------
    attrs
        A run store's attributes (``dataset.attrs`` or
        :attr:`StoreMetadata.attrs`).

    Returns
    -------
    differences
        ``{name: (written, running)}`` for each package of
        :data:`COMPARED_PACKAGES` whose version differs (``written`` None when the
        store does not record it), and ``format_version`` when the store's format
        is not this version's. Empty when the store was written as this version
        would write it.
    """
    try:
        written = json.loads(attrs.get("versions") or "{}")
    except (TypeError, ValueError):
        written = {}
    differences: dict[str, tuple[str | None, str]] = {
        name: (written.get(name), running)
        for name, running in running_versions().items()
        if written.get(name) != running
    }
    if str(attrs.get("format_version")) != str(FORMAT_VERSION):
        differences["format_version"] = (
            str(attrs.get("format_version")),
            str(FORMAT_VERSION),
        )
    return differences


def _version_warning(metadata: StoreMetadata) -> StoreVersionWarning | None:
    differences = version_differences(metadata.attrs)
    if not differences:
        return None
    parts = [
        f"{name} {written or 'unknown'} (this is {running})"
        for name, (written, running) in differences.items()
        if name != "format_version"
    ]
    text = f"{metadata.path} was written by " + ", ".join(parts) if parts else ""
    if "format_version" in differences:
        older = (
            f"in store format {differences['format_version'][0]}, older than format "
            f"{FORMAT_VERSION} that this version writes: variables or attributes "
            "added since are missing"
        )
        text = f"{text}, and {older}" if text else f"{metadata.path} is {older}"
    if parts:
        text += "; its numbers may differ from what these versions compute"
    return StoreVersionWarning(text, metadata.path, differences)


@dataclass(frozen=True)
class StoreVerification:
    """What :func:`verify_run` read of a store.

    Attributes
    ----------
    path : pathlib.Path
        The store.
    arrays : int
        Variables and coordinates read in full.
    chunks : int
        Chunk files read and decoded.
    nbytes : int
        Bytes of decoded data.
    """

    path: Path
    arrays: int
    chunks: int
    nbytes: int


def verify_run(path: str | os.PathLike) -> StoreVerification:
    """Check a run store completely: its metadata, and every chunk of every array.

    Runs the checks of :func:`read_metadata`, then reads every array in full, so
    that every chunk is decompressed, checks that no chunk file a finished run
    writes is missing, and opens the store with xarray. Warns as
    :func:`open_run` does when the store was written by other versions.

    A chunk file that is absent reads as the array's fill value. For float
    arrays (fill value NaN) that is damage, except in a run that diverged or
    failed, whose results may be all NaN: Zarr writes no chunk that holds only
    the fill value. Absent chunks of integer and text arrays are not damage, since
    their fill values (0, "") are ordinary values.

    Parameters
    ----------
    path
        The store's directory.

    Returns
    -------
    verification
        How much was read.

    Raises
    ------
    StoreError
        As :func:`read_metadata`.
    DamagedStoreError
        If a chunk is missing or cannot be decoded, naming the variable and chunk.
    """
    metadata = read_metadata(path)
    verification = _read_every_chunk(metadata)
    _open_dataset(metadata).close()
    _warn_versions(metadata)
    return verification


def _read_every_chunk(metadata: StoreMetadata) -> StoreVerification:
    may_lack_nan_chunks = metadata.attrs["status"] in _NAN_STATUSES
    chunks = nbytes = 0
    for name in sorted(metadata.arrays):
        try:
            array = zarr.open_array(metadata.path / name, mode="r")
        except Exception as error:  # noqa: BLE001 - zarr raises many kinds here
            raise DamagedStoreError(
                metadata.path,
                f"variable {name!r} cannot be opened ({type(error).__name__}: {error})",
                name,
            ) from error
        keys = [
            array.metadata.encode_chunk_key(coords)
            for coords in itertools.product(*(range(n) for n in array.cdata_shape))
        ]
        present = [(metadata.path / name / key).is_file() for key in keys]
        if not may_lack_nan_chunks and _fills_with_nan(array):
            absent = [
                key for key, there in zip(keys, present, strict=True) if not there
            ]
            if absent:
                raise DamagedStoreError(
                    metadata.path,
                    f"variable {name!r} lacks chunk file(s) {', '.join(absent[:5])}"
                    f"{' and more' if len(absent) > 5 else ''} "
                    "(they would read as NaN)",
                    name,
                )
        try:
            _read_whole(array)
        except Exception as error:  # noqa: BLE001 - codecs raise many kinds here
            raise DamagedStoreError(
                metadata.path,
                f"variable {name!r} cannot be read: {_bad_chunk(array, keys)}"
                f"({type(error).__name__}: {error})",
                name,
            ) from error
        chunks += sum(present)
        nbytes += int(array.nbytes)
    return StoreVerification(metadata.path, len(metadata.arrays), chunks, nbytes)


def _fills_with_nan(array: zarr.Array) -> bool:
    fill = array.metadata.fill_value
    return array.dtype.kind in "fc" and bool(np.isnan(fill))


def _read_whole(array: zarr.Array) -> None:
    """Read every chunk of an array, a row of chunks at a time when it is large."""
    if array.nbytes <= _VERIFY_READ_BYTES or array.ndim == 0:
        array[...]
        return
    step = array.chunks[0]
    for start in range(0, array.shape[0], step):
        array[start : start + step]


def _bad_chunk(array: zarr.Array, keys: list[str]) -> str:
    """Which chunk of an array that failed to read is damaged, as text."""
    for coords, key in zip(
        itertools.product(*(range(n) for n in array.cdata_shape)), keys, strict=True
    ):
        try:
            array.blocks[coords]
        except Exception:  # noqa: BLE001 - the first chunk that fails is the one
            return f"chunk file {key} is damaged "
    return ""


def open_run(path: str | os.PathLike, verify: bool = False) -> xr.Dataset:
    """Open a published run store as an xarray Dataset (lazily).

    The store's metadata is checked first (:func:`read_metadata`): a damaged
    store raises rather than opening half-read. A store written by another
    version of stimsynth, torch or plenoptic, or in an older format, opens with a
    :class:`StoreVersionWarning` saying how (see also
    :func:`version_differences`).

    Parameters
    ----------
    path
        The store's directory.
    verify
        Also read every chunk of every array first (:func:`verify_run`), which
        finds truncated or missing chunk files; it reads the whole store.

    Returns
    -------
    dataset
        Trajectory, results and attributes; ``attrs["spec"]`` is JSON. Values are
        read when used.

    Raises
    ------
    StoreError
        If the path holds no store, a prepared image, or a store in a newer
        format than this version reads.
    DamagedStoreError
        If the store is damaged or was never finished; the message names the
        store and the damaged variable.
    """
    metadata = read_metadata(path)
    if verify:
        _read_every_chunk(metadata)
    dataset = _open_dataset(metadata)
    _warn_versions(metadata, stacklevel=3)
    return dataset


def _open_dataset(metadata: StoreMetadata) -> xr.Dataset:
    try:
        return xr.open_zarr(metadata.path, consolidated=True)
    except Exception as error:  # zarr and xarray raise many kinds here
        raise DamagedStoreError(
            metadata.path,
            f"it could not be opened as a run store ({type(error).__name__}: {error})",
        ) from error


def _warn_versions(metadata: StoreMetadata, stacklevel: int = 3) -> None:
    warning = _version_warning(metadata)
    if warning is not None:
        warnings.warn(warning, stacklevel=stacklevel)


def run_spec(dataset: xr.Dataset) -> dict[str, Any]:
    """The full run spec a store was written from."""
    return json.loads(dataset.attrs["spec"])


def _versions_text(text: Any) -> str:
    try:
        versions = json.loads(text)
    except (TypeError, ValueError):
        return "whose version it does not record"
    return f"stimsynth {versions.get('stimsynth', 'unknown')}"


# --- reading chunks without zarr's machinery --------------------------------------
#
# Opening an array through zarr costs about 2 ms, mostly its asynchronous
# machinery; a study table reads one or two small arrays of hundreds of stores.
# Chunks encoded as run stores encode them (the bytes codec, then zstd or nothing)
# are decoded here directly; any other encoding goes through zarr.


def _chunk_shape(meta: dict[str, Any]) -> list[int]:
    return list(meta["chunk_grid"]["configuration"]["chunk_shape"])


def _chunk_grid(meta: dict[str, Any]) -> list[int]:
    return [
        -(-size // chunk) if chunk else 0
        for size, chunk in zip(meta["shape"], _chunk_shape(meta), strict=True)
    ]


def _read_chunk(
    array_path: Path, meta: dict[str, Any], coords: tuple[int, ...]
) -> np.ndarray:
    """One chunk of an array, cut to the part of it inside the array."""
    shape, chunk = meta["shape"], _chunk_shape(meta)
    inside = tuple(
        slice(0, min(c, size - i * c))
        for size, c, i in zip(shape, chunk, coords, strict=True)
    )
    codecs = [codec["name"] for codec in meta.get("codecs", ())]
    encoding = meta.get("chunk_key_encoding", {})
    dtype = _NUMERIC_TYPES.get(meta.get("data_type"))
    if (
        dtype is None
        or codecs not in (["bytes"], ["bytes", "zstd"])
        or encoding.get("name") != "default"
    ):
        array = zarr.open_array(array_path, mode="r")
        return np.asarray(array.blocks[coords])
    separator = encoding.get("configuration", {}).get("separator", "/")
    key = separator.join(["c", *map(str, coords)])
    endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
    dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    try:
        raw = (array_path / key).read_bytes()
    except FileNotFoundError:
        # Zarr writes no chunk that holds only the fill value.
        fill = _fill_value(meta["fill_value"], dtype)
        return np.full(chunk, fill, dtype=dtype.newbyteorder("="))[inside]
    if codecs[-1] == "zstd":
        raw = _ZSTD.decode(raw)
    expected = math.prod(chunk) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"decoded {len(raw)} bytes, expected {expected}")
    values = np.frombuffer(raw, dtype=dtype).reshape(chunk)
    return values.astype(dtype.newbyteorder("="), copy=False)[inside]


def _fill_value(fill: Any, dtype: np.dtype) -> Any:
    if isinstance(fill, str):
        # Zarr 3 writes non-finite floats' fill values as text.
        return {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}[fill]
    return fill


_NUMERIC_TYPES = {
    name: np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float32",
        "float64",
    )
}
_ZSTD = numcodecs.Zstd()


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as JSON values; dicts and lists are kept as JSON text."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, dict | list | tuple):
            out[key] = json.dumps(value, sort_keys=True)
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out
