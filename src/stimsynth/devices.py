"""Which GPU a job computes on, when several jobs share a machine's GPUs.

Snakemake counts GPUs (``snakemake --resources gpu=2`` runs at most two GPU jobs at
once) but does not say which GPU a job gets. A job therefore claims one: it takes
an exclusive lock (:func:`fcntl.flock`) on a file per GPU and keeps it until the
process ends. The kernel drops the lock when the process exits, however it exits,
so a killed job never leaves a GPU claimed.

A scheduler that gives a job its own GPUs (SLURM with ``--gpus``) also sets
``CUDA_VISIBLE_DEVICES`` to them. Locks are named after those entries rather than
after the index torch gives a GPU, so jobs that see different subsets of a machine's
GPUs still agree on which physical GPU a lock stands for; a job that sees one GPU
claims it at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Environment variable naming the folder of GPU lock files.
LOCK_DIR_VARIABLE = "STIMSYNTH_GPU_LOCK_DIR"

#: Variables through which schedulers say which GPUs a job was given.
SCHEDULER_GPU_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_GPUS_ON_NODE",
)


@dataclass(frozen=True)
class Claim:
    """A GPU this process holds: its index as torch numbers it, and its lock."""

    index: int
    key: str
    path: Path
    fd: int


# At most one claim per process: a process that runs several syntheses in turn
# (the test suite) keeps the GPU it claimed first rather than claiming more.
_claim: Claim | None = None


def default_lock_dir() -> Path:
    """The folder of GPU lock files: ``$STIMSYNTH_GPU_LOCK_DIR``, or one in the
    system's temporary folder, shared by every user of the machine."""
    configured = os.environ.get(LOCK_DIR_VARIABLE)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / "stimsynth-gpu-locks"


def gpu_keys(count: int, visible: str | None = None) -> list[str]:
    """Names of the ``count`` GPUs torch sees, in torch's order.

    Parameters
    ----------
    count
        GPUs torch sees.
    visible
        The value of ``CUDA_VISIBLE_DEVICES``; read from the environment if None.

    Returns
    -------
    keys
        Each GPU's entry in ``CUDA_VISIBLE_DEVICES`` (an index, a UUID or a MIG
        name) when it is set, its index otherwise.

    Examples
    --------
    >>> gpu_keys(2, visible="")
    ['0', '1']
    >>> gpu_keys(2, visible="3,GPU-8f2a")
    ['3', 'GPU-8f2a']
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if len(entries) < count:
        return [str(index) for index in range(count)]
    return entries[:count]


def claim_gpu(
    count: int,
    lock_dir: str | os.PathLike | None = None,
    keys: list[str] | None = None,
    wait: bool = False,
    timeout: float | None = None,
    poll_s: float = 1.0,
) -> int | None:
    """Claim one of ``count`` GPUs for the rest of this process's life.

    Parameters
    ----------
    count
        GPUs this process sees.
    lock_dir
        Folder of lock files; :func:`default_lock_dir` if None.
    keys
        Names of the GPUs' locks; :func:`gpu_keys` if None.
    wait
        Whether to wait for a GPU to come free when all are claimed.
    timeout
        Seconds to wait at most; None waits as long as it takes.
    poll_s
        Seconds between looks while waiting.

    Returns
    -------
    index
        The claimed GPU's index as torch numbers it, or None if every GPU stayed
        claimed by other processes.
    """
    global _claim
    if _claim is not None:
        return _claim.index
    if count < 1:
        return None
    keys = gpu_keys(count) if keys is None else keys
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    _make_shared_folder(folder)
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    while True:
        for index, key in enumerate(keys[:count]):
            path = folder / f"gpu-{_file_safe(key)}.lock"
            fd = _try_lock(path)
            if fd is not None:
                _claim = Claim(index, key, path, fd)
                return index
        if not wait or (deadline is not None and time.monotonic() >= deadline):
            return None
        if not announced:
            logger.info(
                "All %d GPUs are claimed by other jobs; waiting for one to come free "
                "(give snakemake --resources gpu=N with N at most the GPUs of this "
                "machine to start no more GPU jobs than there are GPUs)",
                count,
            )
            announced = True
        time.sleep(poll_s)


def claimed_gpu() -> Claim | None:
    """The GPU this process holds, if any."""
    return _claim


def release_gpu() -> None:
    """Give back the GPU this process holds (done anyway when the process ends)."""
    global _claim
    if _claim is not None:
        os.close(_claim.fd)
        _claim = None


def scheduler_gpus(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the scheduler said about this job's GPUs: the variables of
    :data:`SCHEDULER_GPU_VARIABLES` that are set."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in SCHEDULER_GPU_VARIABLES if name in environ}


def in_gpuless_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this is a SLURM job that was granted no GPU.

    Such a job may still see GPUs (a node without cgroups shows all of them), but
    they belong to other jobs.
    """
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ:
        return False
    granted = (
        environ.get("SLURM_JOB_GPUS")
        or environ.get("SLURM_STEP_GPUS")
        or environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0")
    )
    return not granted


def _try_lock(path: Path) -> int | None:
    # Read-only is enough for flock, and lets one user lock a file another made.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _make_shared_folder(folder: Path) -> None:
    if folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    # Like /tmp: everyone may add lock files, no one may remove another's.
    try:
        folder.chmod(0o1777)
    except PermissionError:
        pass


def _file_safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)
