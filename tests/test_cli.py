"""Command-line parsing that needs no cluster: durations with units."""

from __future__ import annotations

import click
import pytest

from edgebft.cli import Seconds


@pytest.mark.parametrize(("text", "seconds"), [
    ("10", 10.0), ("2.5", 2.5), ("10s", 10.0), ("500ms", 0.5), ("1.5m", 90.0), (" 8S ", 8.0)])
def test_durations_take_plain_seconds_or_a_unit(text: str, seconds: float) -> None:
    assert Seconds().convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["", "s", "ten", "10x", "10 h"])
def test_a_bad_duration_is_a_usage_error_naming_it(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a duration"):
        Seconds().convert(text, None, None)
