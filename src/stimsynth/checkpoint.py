"""Checkpoints: what a killed run needs to go on exactly where it left off.

A run keeps, beside its partial store and outside Snakemake's declared outputs,
one checkpoint file. Every ``every`` iterations the run store's buffer is appended
to the partial store and then the checkpoint is replaced, in that order: the
checkpoint never describes iterations the store does not hold. It records how
many iterations and snapshots the store held at that moment, so a run that was
killed later, even in the middle of an append, cuts the store back to those
lengths and goes on from the checkpoint's iteration. Each append fills whole
chunks of ``every`` iterations and one snapshot per chunk, so no chunk that a
checkpoint counts on is ever rewritten.

The file is written to a temporary name, flushed to disk and moved into place
with one rename, so it is either the old checkpoint or the new one, never half
of each.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Iterations between checkpoints (and between appends to the store) by default.
CHECKPOINT_EVERY = 256


class Checkpoint:
    """Saves and loads one run's checkpoint.

    Parameters
    ----------
    path
        The checkpoint file.
    every
        Iterations between checkpoints.
    writer
        The run's store writer, flushed before each checkpoint; its lengths are
        recorded with it.
    identity
        What the checkpoint must match to be resumed from (the run's spec hash):
        a checkpoint of another spec is discarded.
    final_path
        Where the state at the end of the run is kept, for a later round to
        continue from; None keeps none.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        every: int = CHECKPOINT_EVERY,
        writer: Any = None,
        identity: str = "",
        final_path: str | os.PathLike | None = None,
    ):
        if every < 1:
            raise ValueError(f"checkpoint every must be at least 1, got {every}")
        self.path = Path(path)
        self.every = every
        self.writer = writer
        self.identity = identity
        self.saved = 0
        self.final_path = Path(final_path) if final_path is not None else None
        #: Whether the state loaded is that of a finished run sent back for more
        #: iterations, rather than of an interrupted one.
        self.continuing = False
        #: Saved with every checkpoint: what the run's caller keeps across restarts.
        self.meta: dict[str, Any] = {}
        self._loaded: dict[str, Any] | None = None

    def load(self, device: torch.device | str = "cpu") -> dict[str, Any] | None:
        """The last checkpoint of this run, or None when there is none to use.

        A checkpoint that cannot be read, or that belongs to another spec, is
        logged and ignored: the run then starts afresh. The file is read once;
        later calls return what it held.
        """
        if self._loaded is not None:
            return self._loaded
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location=device, weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable file: start afresh
            logger.warning(
                "Ignoring the unreadable checkpoint %s (%s); the run starts afresh",
                self.path,
                error,
            )
            return None
        if state.get("identity") != self.identity:
            logger.warning(
                "Ignoring the checkpoint %s, written for another run spec; the run "
                "starts afresh",
                self.path,
            )
            return None
        self._loaded = state
        return state

    def due(self, iteration: int) -> bool:
        """Whether a checkpoint is due after ``iteration`` (0-based)."""
        return (iteration + 1) % self.every == 0

    def save(self, state: dict[str, Any], final: bool = False) -> None:
        """Append what the store has buffered, then replace the checkpoint (or,
        with ``final``, write the state the run ended with to ``final_path``)."""
        if self.writer is not None:
            self.writer.flush()
            state = {**state, "store_lengths": self.writer.lengths()}
        state = {**state, "identity": self.identity, "meta": self.meta}
        path = self.final_path if final else self.path
        _write_atomically(state, path)
        if not final:
            self.saved += 1
            logger.debug("Checkpoint at iteration %d", state.get("iteration", -1))

    def continue_from(
        self, path: str | os.PathLike, identity: str, device: torch.device | str
    ) -> dict[str, Any] | None:
        """Take the final state of an earlier round, kept at ``path`` for the run
        of spec hash ``identity``, as the state to go on from."""
        earlier = Checkpoint(path, identity=identity).load(device)
        if earlier is not None:
            self._loaded = earlier
            self.continuing = True
        return earlier

    def forget(self) -> None:
        """Drop the checkpoint loaded, and its file: the run starts afresh."""
        self._loaded = None
        self.remove()

    def remove(self) -> None:
        """Delete the checkpoint (once the run is published)."""
        for path in (self.path, self.path.with_name(self.path.name + ".tmp")):
            path.unlink(missing_ok=True)


def _write_atomically(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to a temporary file, flush it to disk and rename it."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        fault_point("checkpoint")
        os.replace(temporary, path)
    except OSError as error:
        from .store import StoreWriteError

        raise StoreWriteError(
            f"cannot write the checkpoint {path}: {error.strerror or error}; free "
            "space or fix the permissions there and run the study again, which "
            "goes on from the last checkpoint written"
        ) from error


#: Environment variable naming a point at which the process kills itself, as
#: ``PLACE:N`` (the N-th time it passes PLACE). Tests use it to kill runs in the
#: middle of an append or of a checkpoint, where a timed kill cannot aim.
FAULT_VARIABLE = "STIMSYNTH_KILL_AT"
_passes: dict[str, int] = {}


def fault_point(place: str) -> None:
    """Kill this process with SIGKILL if the environment asks for it here."""
    wanted = os.environ.get(FAULT_VARIABLE)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != place:
        return
    _passes[place] = _passes.get(place, 0) + 1
    if _passes[place] == int(count or 1):
        logger.warning("Killing this process at %s, as %s asks", place, FAULT_VARIABLE)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
