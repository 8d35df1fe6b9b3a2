"""Errors a user can fix: the ``deepkd`` command prints them as one line, without a traceback.

Anything else (an internal bug, CUDA running out of memory, a KeyboardInterrupt) keeps its
traceback. Each class also derives from the built-in exception a Python caller would expect
(``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` keeps working in library use.
Set ``DEEPKD_DEBUG=1`` to see the traceback of a DeepKDError too.
"""
from __future__ import annotations


class DeepKDError(Exception):
    """A problem with the user's input, files or environment, described in one sentence."""


class ConfigError(DeepKDError, ValueError):
    """A recipe, override or resume that does not fit the schema or the run it continues."""


class DataError(DeepKDError, ValueError):
    """A dataset file that is missing pieces, corrupt, or inconsistent (labels, class folders)."""


class WeightsError(DeepKDError, ValueError):
    """A weights file or source that cannot be read or does not fit the model."""


class MissingFileError(DeepKDError, FileNotFoundError):
    """A file or folder the run needs does not exist (with where to get it)."""


class RunExistsError(DeepKDError, FileExistsError):
    """A run folder that already holds a run (start another or resume it)."""


class RunLockedError(DeepKDError, RuntimeError):
    """A run folder held by another live process."""


class TrainingError(DeepKDError, RuntimeError):
    """Training stopped on a condition the user must act on (a non-finite loss, a failed save)."""


class UnknownNameError(DeepKDError, KeyError):
    """A model, method or other registered name that does not exist (with the closest names)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class MissingPackageError(DeepKDError, ImportError):
    """An optional package a command needs is not installed (with the pip command that installs it)."""


class ExportError(DeepKDError, RuntimeError):
    """A model deepkd cannot export, run or profile yet (detectors), or whose export does not
    reproduce it within the tolerance."""
