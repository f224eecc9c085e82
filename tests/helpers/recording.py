"""A recorder that keeps a synthesis' trajectory in memory, for tests."""

from __future__ import annotations

import numpy as np


class Rows:
    """Keeps every recorded iteration's scalars; ignores snapshots."""

    def __init__(self):
        self.rows = []

    def record(self, iteration, scalars):
        self.rows.append(scalars)

    def snapshot(self, iteration, image):
        pass

    def column(self, name, sample=0):
        """One scalar of one sample, over the iterations recorded."""
        return np.array([np.atleast_1d(row[name])[sample] for row in self.rows])
