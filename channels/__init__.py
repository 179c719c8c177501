"""One module per delivery channel; each raises `TransientError` or `PermanentError`."""
