"""Exception types raised for bad input.

Every error names the offending value and what was expected, so that a user can fix the input
without reading the source.
"""

from __future__ import annotations

__all__ = [
    "SR3DCheckpointError",
    "SR3DConfigError",
    "SR3DDataError",
    "SR3DDependencyError",
    "SR3DDiskError",
    "SR3DError",
    "SR3DInputError",
    "SR3DLimitError",
    "SR3DPluginError",
]


class SR3DError(Exception):
    """Base class for every error raised by sr3d-plugin.

    Messages speak Python, never CLI flags: a parameter the caller can change is written as
    ``name=`` followed by the value or the hint, e.g. ``"pass depth= (a depth map per frame) with
    intrinsics="``, ``"pass overwrite=True to replace it"``, ``"resume='latest': no checkpoint"``.
    ``name`` is the keyword argument of the public function the caller used (a recipe key keeps its
    dotted form, ``training.output_dir``, which the CLI shares).

    The ``sr3d`` command translates such messages into its own flags in one place
    (:func:`sr3d_plugin.cli.flag_wording`, applied where ``main`` catches :class:`SR3DError`): for the
    running sub-command, ``name=VALUE`` becomes ``--flag VALUE``, ``name=True`` of an on/off flag
    becomes ``--flag``, and a bare ``name=`` becomes ``--flag``; ``name`` is matched against the
    sub-command's option destinations (``--num-frames`` ↔ ``num_frames``) plus the table
    :data:`sr3d_plugin.cli.PARAMETER_FLAGS` for parameters whose flag has another name. Names that
    are not parameters of the sub-command are left as written.
    """


class SR3DInputError(SR3DError, ValueError):
    """An input (tensor, file, region, prompt) does not have the expected shape, range or content."""


class SR3DConfigError(SR3DError, ValueError):
    """A configuration or recipe value is unknown, of the wrong type or inconsistent."""


class SR3DPluginError(SR3DError, LookupError):
    """A component name is not registered, or a plugin failed to load."""


class SR3DDependencyError(SR3DError, ImportError):
    """An installed dependency is too old (or missing) for the part of sr3d-plugin that was asked for."""


class SR3DDiskError(SR3DError, OSError):
    """Writing (or moving into place) a file or folder failed: disk full, read-only, no permission, ….

    Also an :class:`OSError`, so code that handles ``OSError`` keeps working. ``errno`` is the
    operating system's code (``errno.ENOSPC``, ``errno.EROFS``, ``errno.EACCES``, …) and
    ``filename`` the path that could not be written. The message names both and what failed.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SR3DLimitError(SR3DInputError):
    """An input file would decode to more pixels (or array elements) than the configured limit.

    Raised from the file's header, before anything is decoded; see :mod:`sr3d_plugin.limits`.
    """


class SR3DDataError(SR3DInputError):
    """Data records failed their check before work started; ``report`` (a
    :class:`~sr3d_plugin.data_check.DataReport`, or None) lists every bad record with file, line and id."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class SR3DCheckpointError(SR3DError, ValueError):
    """A training checkpoint is refused: no manifest (older format), a file modified, truncated, added,
    missing or of a format that could carry a pickle, or states that do not fit the run."""
