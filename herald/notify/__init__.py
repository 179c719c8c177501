"""Notifications: requests into records and delivery jobs, preferences, quiet hours, digests,
rendering, and one module per delivery channel (`channels/`)."""
