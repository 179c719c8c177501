"""Quiet-hours arithmetic: windows crossing midnight, daylight-saving changes in Europe/Berlin, no window.

In 2027 Berlin springs forward on 28 March (02:00 CET -> 03:00 CEST, at 01:00 UTC) and falls back on
31 October (03:00 CEST -> 02:00 CET, at 01:00 UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from herald.notify.quiet_hours import is_known_zone, is_quiet, window_end

BERLIN = ZoneInfo("Europe/Berlin")
NIGHT = (time(22), time(7))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def berlin(text: str, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN, fold=fold)


@pytest.mark.parametrize(
    ("local", "quiet"),
    [
        (time(21, 59, 59), False),
        (time(22), True),
        (time(23, 59), True),
        (time(0), True),
        (time(6, 59, 59), True),
        (time(7), False),
        (time(12), False),
    ],
)
def test_a_window_crossing_midnight_holds_both_sides_of_it(local: time, quiet: bool) -> None:
    assert is_quiet(local, *NIGHT) is quiet


def test_a_window_within_one_day() -> None:
    assert [is_quiet(time(hour), time(12), time(14)) for hour in (11, 12, 13, 14)] == [False, True, True, False]


@pytest.mark.parametrize("moment", [time(0), time(9, 30), time(23, 59, 59)])
def test_start_equal_to_end_is_no_window(moment: time) -> None:
    assert not is_quiet(moment, time(9, 30), time(9, 30))
    assert window_end(berlin(f"2027-01-15T{moment.isoformat()}"), time(9, 30), time(9, 30), BERLIN) is None


def test_late_evening_waits_for_next_morning_and_early_morning_for_the_same_morning() -> None:
    assert window_end(berlin("2027-01-15T23:00"), *NIGHT, BERLIN) == utc("2027-01-16T06:00")
    assert window_end(berlin("2027-01-16T03:00"), *NIGHT, BERLIN) == utc("2027-01-16T06:00")
    assert window_end(berlin("2027-01-16T07:00"), *NIGHT, BERLIN) is None
    assert window_end(berlin("2027-01-15T21:59"), *NIGHT, BERLIN) is None


def test_the_moment_may_be_given_in_any_zone() -> None:
    assert window_end(utc("2027-01-15T22:00"), *NIGHT, BERLIN) == utc("2027-01-16T06:00")  # 23:00 in Berlin
    new_york = ZoneInfo("America/New_York")
    assert window_end(utc("2027-01-16T03:00"), *NIGHT, new_york) == utc("2027-01-16T12:00")  # 22:00 EST


def test_a_night_across_spring_forward_ends_at_seven_summer_time() -> None:
    """07:00 CEST is 05:00 UTC; a fixed offset taken at the start of the night would say 06:00 UTC."""
    start = berlin("2027-03-27T23:30")
    assert start.utcoffset() == berlin("2027-01-01T00:00").utcoffset()  # still winter time
    assert window_end(start, *NIGHT, BERLIN) == utc("2027-03-28T05:00")


def test_a_night_across_fall_back_ends_at_seven_winter_time() -> None:
    assert window_end(berlin("2027-10-30T23:00"), *NIGHT, BERLIN) == utc("2027-10-31T06:00")


def test_an_end_the_clock_skips_ends_the_window_when_the_clock_jumps_past_it() -> None:
    """02:30 does not exist on 28 March 2027 in Berlin: the window ends at 03:00 CEST, 01:00 UTC."""
    ends = window_end(berlin("2027-03-28T01:30"), time(1), time(2, 30), BERLIN)
    assert ends == utc("2027-03-28T01:00")
    assert ends.astimezone(BERLIN).time() == time(3)


def test_an_end_the_clock_reads_twice_ends_the_window_at_the_next_reading() -> None:
    """02:30 comes twice on 31 October 2027 in Berlin: 00:30 UTC (summer time) and 01:30 UTC (winter)."""
    assert window_end(berlin("2027-10-31T01:00"), time(0), time(2, 30), BERLIN) == utc("2027-10-31T00:30")
    second_pass = berlin("2027-10-31T02:10", fold=1)  # the repeated hour, in winter time
    assert second_pass.astimezone(UTC) == utc("2027-10-31T01:10")
    assert window_end(second_pass, time(0), time(2, 30), BERLIN) == utc("2027-10-31T01:30")


def test_a_start_inside_the_skipped_hour_still_starts_the_window() -> None:
    """A 02:15 start on spring-forward night: at 03:00 CEST the clock is past it, so it is quiet."""
    assert window_end(berlin("2027-03-28T03:00"), time(2, 15), time(6), BERLIN) == utc("2027-03-28T04:00")


@pytest.mark.parametrize(("name", "known"), [("Europe/Berlin", True), ("UTC", True), ("Asia/Kolkata", True)])
def test_time_zone_names_are_looked_up(name: str, known: bool) -> None:
    assert is_known_zone(name) is known


@pytest.mark.parametrize("name", ["Mars/Olympus", "europe/berlin", "", "../etc/passwd", "/etc/localtime", "+01:00"])
def test_unknown_time_zone_names_are_refused(name: str) -> None:
    assert not is_known_zone(name)
