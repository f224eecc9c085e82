"""Synthesis methods: metamers, MAD competition, eigendistortions and geodesics.

Each method is a function of tensors and a model that streams its trajectory to a
recorder and returns its result; none of them reads or writes files.
"""

from .eigendistortion import synthesize_eigendistortion
from .geodesic import synthesize_geodesic
from .mad import synthesize_mad
from .metamer import CoarseToFine, synthesize_metamer

#: Version of the synthesis engine's numerics. It is part of every run spec, so
#: raising it reruns every synthesis; raise it when a change alters results.
ENGINE_VERSION = 1

__all__ = [
    "ENGINE_VERSION",
    "CoarseToFine",
    "synthesize_eigendistortion",
    "synthesize_geodesic",
    "synthesize_mad",
    "synthesize_metamer",
]
