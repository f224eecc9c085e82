"""Sending runs that fail the audit back for more iterations, round by round.

After each round the audit's table says which runs failed. Those that can get
better with more iterations, the optimisation runs (metamer, MAD, geodesic) that
ended converged or at ``max_iter``, go on from the state they ended in, each
round adding iterations; an eigendistortion, or a run that diverged, is not sent
back. The study's final table then says which round each verdict comes from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .synthesis.optimize import USABLE_STATUSES

#: Methods whose runs can be sent back for more iterations.
ESCALATED = ("metamer", "mad", "geodesic")

_ROUND = re.compile(r"(?:^|/)rounds/(\d+)/runs/")


def runs_to_send_back(table: pd.DataFrame) -> list[str]:
    """Run ids of the failed runs that more iterations could help.

    Parameters
    ----------
    table
        An audit table (:func:`stimsynth.audit.audit_study`).

    Returns
    -------
    run_ids
        Sorted run ids.
    """
    failed = table[
        (table["verdict"] == "fail")
        & table["method"].isin(ESCALATED)
        & table["status"].isin(USABLE_STATUSES)
    ]
    return sorted(failed["run_id"])


def store_round(store: str | os.PathLike) -> int:
    """The round a store comes from, by its path (0: the first run)."""
    match = _ROUND.search(Path(store).as_posix())
    return int(match.group(1)) if match else 0


def with_rounds(table: pd.DataFrame) -> pd.DataFrame:
    """The audit table with the round each row's store comes from."""
    table = table.copy()
    table.insert(1, "round", [store_round(store) for store in table["store"]])
    return table


def write_round(
    table: pd.DataFrame, table_path: str | os.PathLike, failed_path: str | os.PathLike
) -> list[str]:
    """Write one round's audit table and the runs it sends back (JSON)."""
    with_rounds(table).to_csv(table_path, index=False)
    send_back = runs_to_send_back(table)
    Path(failed_path).write_text(json.dumps(send_back, indent=1) + "\n")
    return send_back


def round_history(
    round_tables: Sequence[str | os.PathLike], final: pd.DataFrame
) -> pd.DataFrame:
    """Every round's verdicts, one row per run and audit, oldest first.

    Parameters
    ----------
    round_tables
        The tables written by :func:`write_round`, in round order.
    final
        The final audit table.

    Returns
    -------
    history
        The rows of every table, with the column ``audit`` numbering the audits.
    """
    tables = [pd.read_csv(path) for path in round_tables]
    tables.append(with_rounds(final))
    for number, table in enumerate(tables):
        table.insert(0, "audit", number)
    return pd.concat(tables, ignore_index=True)


def latest_run_stores(results: str | os.PathLike) -> list[Path]:
    """Each run's latest store in a results folder: that of the last round it
    was sent back for, or its first one.

    Parameters
    ----------
    results
        A study's results folder (holding ``runs/`` and, after escalation,
        ``rounds/R/runs/``).

    Returns
    -------
    stores
        One store per run, sorted by run id.
    """
    from .audit import find_run_stores

    results = Path(results)
    folders = [results / "runs"]
    rounds = results / "rounds"
    if rounds.is_dir():
        numbered = [p for p in rounds.iterdir() if p.name.isdigit()]
        folders += [p / "runs" for p in sorted(numbered, key=lambda p: int(p.name))]
    latest: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for store in find_run_stores(folder):
            run_id = store.relative_to(folder).with_suffix("").as_posix()
            latest[run_id] = store
    return [latest[run_id] for run_id in sorted(latest)]
