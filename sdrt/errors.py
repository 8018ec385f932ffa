"""Errors (and warnings) a user can act on.

A :class:`UserError` carries one line that names the bad value and what is allowed; the CLI prints it to
stderr without a traceback and exits non-zero. A :class:`SdrtWarning` is one line too.
"""


class UserError(Exception):
    """A problem with what the user asked for or pointed us at (not a bug in sdrt)."""

    exit_code = 2


class StageError(UserError):
    """A stage produced unusable numbers (NaN or inf); names the stage."""

    exit_code = 3


class MissingDependencyError(UserError):
    """An optional dependency is missing; names the extra that provides it."""

    exit_code = 4

    def __init__(self, module: str, extra: str, what: str = ""):
        self.module = module
        self.extra = extra
        why = f" ({what})" if what else ""
        super().__init__(f"{module} is not installed{why}: pip install 'sdrt[{extra}]'")


class SdrtWarning(UserWarning):
    """Something the user asked for was done differently, or may not mean what they think; one line.

    Emitted with :func:`warnings.warn`, so library users filter it as any warning; the CLI prints it as
    ``sdrt COMMAND: warning: ...``.
    """
