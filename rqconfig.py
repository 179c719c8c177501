"""Settings module for RQ's command line: `rq worker -c rqconfig high default low`.

RQ reads the upper-case names of this module; the value comes from `settings.py`, so the
`rq` commands use the same `REDIS_URL` (environment or `.env`) as the service.
"""

from settings import get_settings

REDIS_URL = get_settings().redis_url
