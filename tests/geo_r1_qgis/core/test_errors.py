"""The one error hierarchy: every error is a GeoR1Error and also the builtin it resembles."""

import pytest

from geo_r1_qgis.core import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigError, ValueError),
        (errors.RasterError, OSError),
        (errors.NotGeoreferencedError, OSError),
        (errors.EmptyRasterError, OSError),
        (errors.ExtentError, ValueError),
        (errors.EngineUnavailableError, ConnectionError),
        (errors.EngineRequestError, RuntimeError),
        (errors.ModelNotFoundError, FileNotFoundError),
        (errors.OutputError, OSError),
        (errors.EngineOverloadedError, MemoryError),
    ],
)
def test_each_error_is_a_geo_r1_error_and_its_builtin(cls, builtin):
    exc = cls("what went wrong and what to do")
    assert isinstance(exc, errors.GeoR1Error) and isinstance(exc, builtin)
    assert str(exc) == "what went wrong and what to do"


def test_raster_errors_share_a_base_callers_can_catch():
    assert issubclass(errors.NotGeoreferencedError, errors.RasterError)
    assert issubclass(errors.EmptyRasterError, errors.RasterError)


def test_engine_request_error_keeps_the_http_status():
    assert errors.EngineRequestError("refused", status=401).status == 401
    assert errors.EngineRequestError("bad").status is None


def test_every_public_error_is_covered_above():
    public = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.GeoR1Error)}
    assert public == {
        "GeoR1Error",
        "ConfigError",
        "RasterError",
        "NotGeoreferencedError",
        "EmptyRasterError",
        "ExtentError",
        "EngineUnavailableError",
        "EngineRequestError",
        "ModelNotFoundError",
        "OutputError",
        "EngineOverloadedError",
    }
