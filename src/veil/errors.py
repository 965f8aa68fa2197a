"""User-facing errors.

Every error a user can cause by bad input derives from :class:`VeilError`; the command line prints
its message on one line and exits with status 2.
"""

from __future__ import annotations


class VeilError(Exception):
    """A problem with the user's input (configuration, data, files); shown as one line."""


class ConfigError(VeilError, ValueError):
    """An option value is invalid (unknown name, out-of-range number, incompatible combination)."""


class DatasetError(VeilError):
    """A dataset folder is missing, empty or malformed."""


class CheckpointError(VeilError):
    """A checkpoint or weights file is missing, corrupted or truncated."""


class RecordError(VeilError):
    """A run record is missing, incomplete, or would be overwritten."""


class TrainingDiverged(VeilError, FloatingPointError):
    """The training loss became NaN or infinite (a learning rate too high for the model, say)."""
