"""stimsynth: reproducible, audited image synthesis from models of vision."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stimsynth")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
