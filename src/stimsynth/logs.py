"""Logging for jobs: library logs and progress bars go to the job's log file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from .errors import InputError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def job_logging(
    log_path: str | os.PathLike | None, level: int = logging.INFO
) -> Iterator:
    """Send logging and standard error (progress bars, warnings) to ``log_path``.

    An :class:`~stimsynth.errors.InputError` raised inside the block ends the job
    with its message alone, in the log and on standard error; any other exception
    is logged with its traceback before it propagates.

    Parameters
    ----------
    log_path
        The job's log file; None logs to standard error.
    level
        Logging level of the root logger.
    """
    if log_path is None:
        logging.basicConfig(level=level, format=FORMAT)
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(True)
        saved = sys.stderr
        sys.stderr = stream
        try:
            yield
        except InputError as error:
            logging.getLogger("stimsynth").error("%s", error)
            print(f"stimsynth: {error}", file=saved)
            raise SystemExit(1) from None
        except Exception:
            logging.getLogger("stimsynth").exception("The job failed")
            raise
        finally:
            sys.stderr = saved
            root.removeHandler(handler)
