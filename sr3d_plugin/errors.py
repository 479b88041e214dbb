"""Exception types raised for bad input.

Every error names the offending value and what was expected, so that a user can fix the input
without reading the source.
"""

from __future__ import annotations

__all__ = ["SR3DConfigError", "SR3DDependencyError", "SR3DError", "SR3DInputError", "SR3DPluginError"]


class SR3DError(Exception):
    """Base class for every error raised by sr3d-plugin."""


class SR3DInputError(SR3DError, ValueError):
    """An input (tensor, file, region, prompt) does not have the expected shape, range or content."""


class SR3DConfigError(SR3DError, ValueError):
    """A configuration or recipe value is unknown, of the wrong type or inconsistent."""


class SR3DPluginError(SR3DError, LookupError):
    """A component name is not registered, or a plugin failed to load."""


class SR3DDependencyError(SR3DError, ImportError):
    """An installed dependency is too old (or missing) for the part of sr3d-plugin that was asked for."""
