"""The one seam to RQ: every subclass of an RQ or rq-scheduler class, every private name of RQ,
rq-scheduler or redis-py, and the Lua scripts that read RQ's job hashes live in this package."""
