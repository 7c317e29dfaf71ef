"""Exceptions raised by vlmsafe.

Every error a user can cause (a wrong path, an unsupported model, a layer out of range, a malformed
file, a number that is not finite) is raised as a :class:`VlmsafeError` subclass whose message names
the problem *and* the fix, in the form ``"<where>: <problem>; <fix>"``. The CLI prints these messages
as one line on stderr and exits with code 2, without a traceback. A bug in vlmsafe itself (an internal
invariant broken) is an :class:`InternalError` instead, which keeps its traceback.
"""


class VlmsafeError(Exception):
    """Base class of all user-facing vlmsafe errors."""


class UnsupportedModelError(VlmsafeError, TypeError):
    """No adapter is registered for a model class."""


class InputError(VlmsafeError, ValueError):
    """An argument or input is invalid (a non-finite number, a missing image token, a bad option...)."""


class LayerIndexError(VlmsafeError, IndexError):
    """A requested layer index does not exist in the model, or a layer selection is malformed."""


class FileFormatError(VlmsafeError, ValueError):
    """A file is missing, truncated, corrupted or has the wrong layout."""


class IncompatibleVectorsError(VlmsafeError, ValueError):
    """Saved steering vectors do not match the model they are applied to."""


class OutputExistsError(VlmsafeError, FileExistsError):
    """An output path already holds something the user did not ask vlmsafe to replace."""


class OutputBusyError(VlmsafeError):
    """Another vlmsafe run is writing the same output (it holds the output's lock)."""


class OutputWriteError(VlmsafeError, OSError):
    """An output could not be written for want of room, quota or a writable file system (ENOSPC, EDQUOT...)."""


class InternalError(RuntimeError):
    """A broken invariant inside vlmsafe: a bug to report, never the user's input.

    Deliberately *not* a :class:`VlmsafeError`: the CLI prints those as one line telling the user what to fix,
    while a bug must surface with its traceback. It subclasses ``RuntimeError``, which these raises were before, so
    existing ``except RuntimeError`` callers keep working.
    """
