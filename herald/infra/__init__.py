"""Infrastructure: Redis connections, key names, logs and metrics. Imports `settings` only."""
