"""Errors a user can act on; the CLI prints them as one line, without a traceback."""


class TogetherError(Exception):
    """Base class: the message says what went wrong and how to fix it."""


class ModelError(TogetherError):
    """A model could not be found, read or understood."""


class ShardSpecError(TogetherError):
    """A --shards / --layers specification is invalid."""


class RequestError(TogetherError):
    """A generation request is impossible (e.g. prompt longer than the context)."""


class GroupError(TogetherError):
    """A tensor-parallel group could not form, or lost a rank (the stage must be re-formed)."""


class BackendMissing(RequestError):
    """A backend whose framework is not installed here; the message names the extra to install."""
