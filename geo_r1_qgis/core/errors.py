"""One small error hierarchy for the whole project.

Every error derives from :class:`GeoR1Error` and also from the builtin it resembles, so callers
that only know the builtin (``OSError``, ``ValueError``, ``ConnectionError``) still catch it.
Messages show the bad value and say what to do about it. Errors are caught only at boundaries:
the command line, the HTTP handler and the QGIS task.

This module is pure Python: the QGIS plugin, the engine and the trainer all import it.
"""

from __future__ import annotations


class GeoR1Error(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(GeoR1Error, ValueError):
    """A configuration value is invalid. The message names the value and the fix."""


class RasterError(GeoR1Error, OSError):
    """A raster cannot be read (missing, corrupt, or of an unsupported kind)."""


class NotGeoreferencedError(RasterError):
    """A raster has no CRS or no geotransform, so results could not be placed on a map."""


class EmptyRasterError(RasterError):
    """A raster (or the requested part of it) holds no valid pixel: everything is nodata."""


class ExtentError(GeoR1Error, ValueError):
    """A requested extent is empty or lies outside the raster."""


class EngineUnavailableError(GeoR1Error, ConnectionError):
    """The engine cannot be reached (not started, killed, or wrong address)."""


class EngineRequestError(GeoR1Error, RuntimeError):
    """The engine answered, but with an error (bad request, bad token, out of memory...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ModelNotFoundError(GeoR1Error, FileNotFoundError):
    """Model weights (or a processor, or an adapter) were not found where they were looked for."""


class OutputError(GeoR1Error, OSError):
    """The output cannot be written (exists and would be overwritten, or is not a GeoPackage)."""


class EngineOverloadedError(GeoR1Error, MemoryError):
    """The engine ran out of memory (or capacity) for this request; it goes on serving others."""
