"""Errors a user can act on: the CLI prints their message alone instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) whose message names the fix."""


class ConfigError(UserError, ValueError):
    """A bad configuration value."""


class DataError(UserError, RuntimeError):
    """A data set that is missing, empty or unreadable."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or made for another model."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first UserError in an exception's chain (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
