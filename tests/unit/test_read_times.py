"""Read times (`?at=` on the worker, `--at` of snapshot and redis-get): finite, in range, or a clear error."""

from __future__ import annotations

import pytest

from schemas.events import MAX_TS
from stream_app.cli import main
from stream_app.worker.web import parse_read_time


def test_the_http_at_parameter_is_a_finite_epoch_time_in_range() -> None:
    assert parse_read_time(None) is None
    assert parse_read_time("0") == 0.0 and parse_read_time("1700000000.5") == 1700000000.5
    assert parse_read_time(str(MAX_TS - 1)) == MAX_TS - 1
    with pytest.raises(ValueError, match=r"^at='soon' is not a number of epoch seconds$"):
        parse_read_time("soon")
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match="is not a finite epoch time in seconds"):
            parse_read_time(bad)
    for bad in ("-1", "7258118400", "1e300"):
        with pytest.raises(ValueError, match=r"outside 1970-01-01\.\.2200-01-01"):
            parse_read_time(bad)


@pytest.mark.parametrize("command", [["snapshot"], ["redis-get", "u1"]])
@pytest.mark.parametrize(("at", "says"), [
    ("nan", "is not a finite epoch time"), ("inf", "is not a finite epoch time"), ("-5", "outside 1970-01-01"),
    ("7258118400", "outside 1970-01-01"), ("yesterday", "not a number of epoch seconds"),
])
def test_the_cli_refuses_a_bad_at_before_it_connects_to_anything(command: list[str], at: str, says: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--at", at])
    assert exited.value.code == 2  # argparse's usage error: nothing was read or connected to
    err = capsys.readouterr().err
    assert "argument --at" in err and says in err, err
