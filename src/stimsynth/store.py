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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from .checkpoint import CHECKPOINT_EVERY, fault_point

logger = logging.getLogger(__name__)

#: Version of the store layout; a reader compares it with its own.
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """A run store is missing, incomplete or damaged."""


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
        Iterations buffered in memory between appends.
    """

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
            cut_store(self.path, resume)
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

    def flush(self) -> None:
        """Append everything buffered to the store."""
        if self._rows:
            self._append(self._scalars_dataset(), "iteration", len(self._rows))
            self._rows = []
            fault_point("flush")
        if self._snapshots:
            self._append(self._snapshot_dataset(), "snapshot", len(self._snapshots))
            self._snapshots = []

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
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    logger.info("Published %s", final)
    return final


def open_run(path: str | os.PathLike) -> xr.Dataset:
    """Open a published run store as an xarray Dataset (lazily).

    Parameters
    ----------
    path
        The store's directory.

    Returns
    -------
    dataset
        Trajectory, results and attributes; ``attrs["spec"]`` is JSON.

    Raises
    ------
    StoreError
        If the path holds no store, or a store that was never finished.
    """
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a run store (no zarr.json)")
    try:
        dataset = xr.open_zarr(path, consolidated=True)
    except Exception as error:  # zarr and xarray raise many kinds here
        raise StoreError(
            f"{path} could not be opened as a run store: {error}"
        ) from error
    if "status" not in dataset.attrs:
        if "run_id" not in dataset.attrs and "image" in dataset:
            raise StoreError(f"{path} holds a prepared image, not a run")
        raise StoreError(f"{path} has no outcome: the run that wrote it never finished")
    return dataset


def run_spec(dataset: xr.Dataset) -> dict[str, Any]:
    """The full run spec a store was written from."""
    return json.loads(dataset.attrs["spec"])


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
