"""A job function that imports nothing: RQ's own cost per job, without the project's imports."""


def noop() -> None:
    """Do nothing."""
