"""The error a user can cause and fix: a bad config, image, model or metric, or a
results folder that cannot be written."""


class InputError(ValueError):
    """A study input cannot be used; the message names the entry and the fix.

    Jobs report these with their message alone: the traceback of a mistake in a
    config helps no one. A place that cannot be written (a full disk, no
    permission) is reported the same way, by
    :class:`stimsynth.store.StoreWriteError`.
    """
