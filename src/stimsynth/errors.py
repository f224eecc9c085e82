"""The error a user can cause and fix: a bad config, image, model or metric."""


class InputError(ValueError):
    """A study input cannot be used; the message names the entry and the fix.

    Jobs report these with their message alone: the traceback of a mistake in a
    config helps no one.
    """
