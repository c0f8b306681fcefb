"""Errors that the CLI reports as one clear message instead of a traceback."""


class CLExtError(Exception):
    """Base class: the message is meant for the user as it stands."""


class RecipeError(CLExtError, ValueError):
    """A recipe that cannot be used; the message names the file and the dotted key."""


class RegistryError(CLExtError):
    """A third-party registration that cannot be used: an entry point that fails to load, a name
    that a built-in already has; the message names the entry point and its distribution."""


class DataNotFoundError(CLExtError, FileNotFoundError):
    """A benchmark's data is neither on disk nor downloadable; the message says where to put it."""


class DataError(CLExtError, ValueError):
    """A benchmark's data is there but cannot be used as it stands; the message names the file,
    the array and what was found in it."""
