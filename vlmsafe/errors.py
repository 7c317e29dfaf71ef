"""Exceptions raised by vlmsafe.

Every error a user can cause (a wrong path, an unsupported model, a layer out of range, a malformed
file) is raised as a :class:`VlmsafeError` subclass whose message names the problem *and* the fix.
The CLI prints these messages without a traceback.
"""


class VlmsafeError(Exception):
    """Base class of all user-facing vlmsafe errors."""


class UnsupportedModelError(VlmsafeError, TypeError):
    """No adapter is registered for a model class."""


class InputError(VlmsafeError, ValueError):
    """Inputs do not fit the model (missing image token, image for a text-only model, ...)."""


class LayerIndexError(VlmsafeError, IndexError):
    """A requested layer index does not exist in the model."""


class FileFormatError(VlmsafeError, ValueError):
    """A file is missing, truncated, corrupted or has the wrong layout."""


class IncompatibleVectorsError(VlmsafeError, ValueError):
    """Saved steering vectors do not match the model they are applied to."""
