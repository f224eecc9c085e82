"""A study's runs at a glance: one table row per published run store.

:func:`open_study` finds every published store of a study (``RESULTS/runs``, laid
out as ``<method>/<group>/<image>/seed<N>.zarr``) and summarises each from its
metadata and a few small final values, without loading any trajectory or
snapshot, so that a study of hundreds of runs is tabulated in about a second.
Trajectories are opened lazily, one run at a time, through :meth:`Study.open` and
:meth:`Study.trajectory`.

Only published stores are read. A run still going writes its partial store under
``RESULTS/.partial``, which is never searched, and moves it to ``RESULTS/runs``
with one rename once it is complete, so the table never shows a run half written.
A store that cannot be summarised (damaged metadata, a missing variable or
attribute, an unreadable chunk of a final value, a format newer than this version
reads) is listed in :attr:`Study.damaged` with the reason, and a warning is logged;
it never stops the table.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .store import (
    COMPARED_PACKAGES,
    DamagedStoreError,
    NotARunError,
    StoreError,
    StoreMetadata,
    open_run,
    read_metadata,
    verify_run,
    version_differences,
)

logger = logging.getLogger(__name__)

#: Columns of :attr:`Study.table`, in order.
COLUMNS = (
    "run_id",
    "method",
    "group",
    "model",
    "image",
    "seed",
    "status",
    "stop_reason",
    "iterations",
    "final_objective",
    "wall_time_s",
    "started",
    "finished",
    "resumed_at",
    "device",
    "dtype",
    "format_version",
    "stimsynth_version",
    "torch_version",
    "plenoptic_version",
    "python_version",
    "version_differences",
    "git_commit",
    "config_hash",
    "spec_hash",
    "path",
)

#: Columns of :attr:`Study.damaged`.
DAMAGED_COLUMNS = ("run_id", "reason", "variable", "path")

# Dimensions along which a store holds its trajectory.
_TRAJECTORY_DIMS = {"iteration", "snapshot"}


@dataclass
class Study:
    """The published run stores of one study, summarised.

    Made by :func:`open_study`.

    Attributes
    ----------
    root : pathlib.Path
        The folder that was searched (a study's ``results/runs``).
    table : pandas.DataFrame
        One row per readable run, sorted by run id, with the columns
        :data:`COLUMNS`. ``run_id`` is the store's path under ``root`` without
        ``.zarr`` (``method/group/image/seedN`` in a study).
        ``final_objective`` is the number a run is summed up by, as in the audit:
        the final representation loss (metamer; the largest of its samples), the
        largest final objective of the four directions (MAD), the top eigenvalue
        (eigendistortion) or the final path energy (geodesic).
        ``resumed_at`` lists the iterations the run was resumed from.
        ``version_differences`` says which of stimsynth, torch and plenoptic (and
        the store format) differ from this process's, empty when none does.
    damaged : pandas.DataFrame
        One row per store that could not be summarised, with the columns
        :data:`DAMAGED_COLUMNS`: its run id, why, the damaged variable (when the
        damage lies in one) and its path.
    """

    root: Path
    table: pd.DataFrame
    damaged: pd.DataFrame

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return (
            f"<Study {self.root}: {len(self.table)} runs, "
            f"{len(self.damaged)} damaged stores>"
        )

    def path(self, run_id: str) -> Path:
        """The store of a run, readable or damaged.

        Raises
        ------
        KeyError
            If the study has no run of that id.
        """
        for frame in (self.table, self.damaged):
            match = frame.loc[frame["run_id"] == run_id, "path"]
            if len(match):
                return Path(match.iloc[0])
        raise KeyError(f"{self.root} holds no run {run_id!r}")

    def open(self, run_id: str, verify: bool = False) -> xr.Dataset:
        """A run's whole store, opened lazily (see :func:`stimsynth.store.open_run`).

        Raises
        ------
        KeyError
            If the study has no run of that id.
        stimsynth.store.StoreError
            If the store is damaged.
        """
        return open_run(self.path(run_id), verify=verify)

    def trajectory(self, run_id: str) -> xr.Dataset:
        """A run's per-iteration values and snapshots, opened lazily.

        Returns
        -------
        trajectory
            The variables of the store along ``iteration`` or ``snapshot``, with
            the store's attributes; values are read from disk when used.
        """
        dataset = self.open(run_id)
        names = [
            name
            for name, variable in dataset.data_vars.items()
            if _TRAJECTORY_DIMS & set(variable.dims)
        ]
        return dataset[names]

    def runs(self) -> Iterator[str]:
        """The run ids of the readable runs, in order."""
        return iter(self.table["run_id"])


def open_study(results: str | os.PathLike, verify: bool = False) -> Study:
    """Summarise every published run store of a study.

    Parameters
    ----------
    results
        The study's results folder (its ``runs`` folder is searched), or a folder
        of run stores itself.
    verify
        Also read every chunk of every store (:func:`stimsynth.store.verify_run`),
        which finds damaged trajectory chunks too; it reads every store whole.
        Without it, only metadata and the small final values in the table are
        read.

    Returns
    -------
    study
        The table of runs and the list of damaged stores.

    Raises
    ------
    FileNotFoundError
        If ``results`` is not a folder.
    """
    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a folder of study results")
    root = results / "runs" if (results / "runs").is_dir() else results
    rows, damaged = [], []
    differing = 0
    for path in find_published_stores(root):
        run_id = _run_id(path, root)
        try:
            if verify:
                verify_run(path)
            row = summarize_run(path)
        except DamagedStoreError as error:
            damaged.append((run_id, error.problem, error.variable, str(path)))
            continue
        except NotARunError as error:
            if (path / "zarr.json").is_file():
                # A prepared image, in a folder searched without a runs folder.
                logger.debug("Skipping %s: %s", path, error)
                continue
            damaged.append((run_id, str(error), None, str(path)))
            continue
        except StoreError as error:
            damaged.append((run_id, str(error), None, str(path)))
            continue
        row["run_id"] = run_id
        differing += bool(row["version_differences"])
        rows.append(row)

    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table = table.sort_values("run_id", kind="stable", ignore_index=True)
    damaged_table = pd.DataFrame(damaged, columns=list(DAMAGED_COLUMNS))
    logger.info("Study %s: %d runs, %d damaged", root, len(table), len(damaged))
    if damaged:
        logger.warning(
            "%d of %d run stores under %s are damaged and left out of the table: %s",
            len(damaged),
            len(damaged) + len(table),
            root,
            "; ".join(f"{run_id}: {reason}" for run_id, reason, _, _ in damaged),
        )
    if differing:
        logger.warning(
            "%d of %d runs under %s were written by other versions of %s than this "
            "one (see the version_differences column)",
            differing,
            len(table),
            root,
            ", ".join(COMPARED_PACKAGES),
        )
    return Study(root, table, damaged_table)


def find_published_stores(root: str | os.PathLike) -> list[Path]:
    """Every store under a folder of published runs.

    A store is a folder whose name ends in ``.zarr``; the search does not descend
    into stores, nor into folders whose name starts with a dot (such as a study's
    ``.partial``, where runs still going write). A ``.zarr`` folder without
    ``zarr.json`` is returned too: in a folder of published runs it is a damaged
    store, which the reader reports.

    Parameters
    ----------
    root
        A study's ``results/runs``.

    Returns
    -------
    stores
        Their paths, sorted.
    """
    stores = []
    for parent, dirnames, _ in os.walk(root):
        descend = []
        for name in dirnames:
            if name.startswith("."):
                continue
            if name.endswith(".zarr"):
                stores.append(Path(parent) / name)
            else:
                descend.append(name)
        dirnames[:] = descend
    return sorted(stores)


def summarize_run(path: str | os.PathLike) -> dict[str, Any]:
    """One run's row of the study table, from its metadata and small final values.

    Parameters
    ----------
    path
        A published run store.

    Returns
    -------
    row
        A value for each name in :data:`COLUMNS`; ``run_id`` is the run id the
        store records.

    Raises
    ------
    stimsynth.store.StoreError
        If the store cannot be read; :class:`stimsynth.store.DamagedStoreError`
        names the damaged variable.
    """
    metadata = read_metadata(path)
    attrs = metadata.attrs
    spec = metadata.spec()
    settings = spec.get("settings") or {}
    versions = metadata.versions()
    method = metadata.method
    model = settings.get("model")
    if method == "mad":
        model = " vs ".join(settings.get("metrics") or spec.get("metrics") or [])
    differences = version_differences(attrs)
    return {
        "run_id": attrs["run_id"],
        "method": method,
        "group": spec.get("group"),
        "model": model,
        "image": spec.get("image"),
        "seed": spec.get("seed"),
        "status": attrs["status"],
        "stop_reason": attrs["stop_reason"],
        "iterations": attrs["iterations"],
        "final_objective": final_objective(metadata),
        "wall_time_s": attrs.get("wall_time_s"),
        "started": attrs.get("started"),
        "finished": attrs.get("finished"),
        "resumed_at": _json_list(attrs.get("resumed_at")),
        "device": attrs.get("device"),
        "dtype": attrs.get("dtype"),
        "format_version": attrs["format_version"],
        "stimsynth_version": versions.get("stimsynth"),
        "torch_version": versions.get("torch"),
        "plenoptic_version": versions.get("plenoptic"),
        "python_version": versions.get("python"),
        "version_differences": "; ".join(
            f"{name} {written} (running {running})"
            for name, (written, running) in differences.items()
        ),
        "git_commit": attrs.get("git_commit"),
        "config_hash": attrs.get("config_hash"),
        "spec_hash": attrs.get("spec_hash"),
        "path": str(metadata.path),
    }


def final_objective(metadata: StoreMetadata) -> float:
    """The number a run is summed up by, read from its small final values.

    The final representation loss (metamer; the largest of its samples), the
    largest final objective of the four directions (MAD, from the last iteration
    of its trajectory), the top eigenvalue (eigendistortion) or the final path
    energy (geodesic); NaN for an unknown method.

    Raises
    ------
    stimsynth.store.DamagedStoreError
        If the variable is missing or cannot be decoded.
    """
    method = metadata.method
    if method == "metamer":
        return float(np.max(metadata.values("final_loss")))
    if method == "mad":
        return float(np.max(metadata.last("objective")))
    if method == "eigendistortion":
        values = metadata.values("eigenvalue")
        if "eigenindex" in metadata.arrays:
            # Eigenindex 0 is the top eigendistortion.
            values = values[np.argsort(metadata.values("eigenindex"), kind="stable")]
        return float(values[0])
    if method == "geodesic":
        return float(metadata.values("final_path_energy"))
    return float("nan")


def _run_id(path: Path, root: Path) -> str:
    """A store's run id: its path under the runs folder, without ``.zarr``."""
    return path.relative_to(root).with_suffix("").as_posix()


def _json_list(text: Any) -> list:
    """A JSON list attribute as a list; absent or unreadable gives an empty one."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return []
    return list(value) if isinstance(value, list | tuple) else []
