"""Quiet hours: whether a moment falls inside a user's daily quiet window, and when that window ends.

The window is given in wall-clock times of the user's time zone and may cross midnight (22:00 to
07:00). Everything is computed with `zoneinfo`, so a window stays at its wall-clock times across
daylight-saving changes: a 07:00 end is 06:00 UTC in Berlin in winter and 05:00 UTC in summer.

- A moment is inside the window when its local wall-clock time is in [start, end); start == end is
  no window at all.
- The window ends at the first instant after that moment at which the local clock reads `end`. An
  `end` the clock skips (spring forward) ends the window when the clock jumps past it; an `end` the
  clock reads twice (fall back) ends it the next time it is read.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, available_timezones


def is_quiet(local: time, start: time, end: time) -> bool:
    """Whether the wall-clock time `local` is inside the window [start, end), which may cross midnight."""
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


def window_end(moment: datetime, start: time, end: time, zone: ZoneInfo) -> datetime | None:
    """The end of the quiet window that `moment` (aware) is in, in UTC; None when it is in none."""
    local = moment.astimezone(zone)
    if not is_quiet(local.time(), start, end):
        return None
    day = local.date() + timedelta(days=1 if start > end and local.time() >= start else 0)
    return first_reading(datetime.combine(day, end), zone, after=moment)


def first_reading(wall: datetime, zone: ZoneInfo, after: datetime) -> datetime:
    """The first instant later than `after` at which clocks in `zone` read the naive `wall` time, in UTC;
    the instant they jump past it when they skip it."""
    readings = [wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1)]
    real = [instant for instant in readings if _reads(instant, zone) == wall and instant > after]
    return min(real) if real else _jump_past(wall, zone, min(readings), max(readings))


def _reads(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive wall-clock time in `zone` at `instant`."""
    return instant.astimezone(zone).replace(tzinfo=None)


def _jump_past(wall: datetime, zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The whole second at which clocks jump from before `wall` to after it (a spring-forward gap):
    bisection between an instant that reads earlier and one that reads later."""
    low, high = int(before.timestamp()), int(after.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if _reads(datetime.fromtimestamp(middle, UTC), zone) >= wall:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


@lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones())


def is_known_zone(name: str) -> bool:
    """An IANA time zone name that `zoneinfo` can load (from the system's database or `tzdata`)."""
    return name in _known_zones()


def parse_wall_time(text: str) -> time:
    """`HH:MM` or `HH:MM:SS` (already validated) as a naive time."""
    return time.fromisoformat(text)
