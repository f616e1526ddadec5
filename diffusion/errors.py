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


class EvaluationStopped(Exception):
    """A signal stopped an evaluation of a fit whose last step was already saved: nothing is lost, the run ends
    (the CLI prints the message and exits 0, as for a signal during training)."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first UserError in an exception's chain (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def describe(error: BaseException) -> str:
    """An error's type and first line, and its root cause's when that is another error: torch.compile wraps a
    backend's error in ``BackendCompilerFailed``, whose first line does not say what went wrong."""

    def line(e: BaseException) -> str:
        text = next((t.strip() for t in str(e).splitlines() if t.strip()), "")
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    root, seen = error, {id(error)}
    while (root.__cause__ or root.__context__) is not None and id(root.__cause__ or root.__context__) not in seen:
        root = root.__cause__ or root.__context__
        seen.add(id(root))
    return line(error) if root is error else f"{line(error)} (caused by {line(root)})"
