"""Running the workflow on a study folder, as the tests that go through snakemake do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def snakemake_command(workdir: Path, *args: str, cores: int = 2) -> list[str]:
    """The snakemake command for the study in ``workdir/study.yaml``, run there."""
    return [
        *(sys.executable, "-m", "snakemake"),
        *("--snakefile", str(REPO / "Snakefile")),
        *("--directory", str(workdir)),
        *("--configfile", str(workdir / "study.yaml")),
        *("--cores", str(cores)),
        *args,
    ]


def snakemake_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's snakemake: the repository on the path, so that
    the models in tests/helpers import, and Python's warnings off."""
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }


def run_snakemake(
    workdir: Path, *args: str, env: dict[str, str] | None = None, cores: int = 2
) -> subprocess.CompletedProcess:
    """Run snakemake on ``workdir``'s study and wait for it."""
    return subprocess.run(
        snakemake_command(workdir, *args, cores=cores),
        capture_output=True,
        text=True,
        env=snakemake_env(env),
    )
