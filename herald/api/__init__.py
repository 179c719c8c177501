"""The HTTP edge's parts besides the routes of `app.py`: middleware (`middleware`, `security`), error
answers (`errors`), idempotency, the in-app inbox routes, rq-dashboard at `/rq` and the MCP tools at
`/mcp`. Nothing worker-side imports this package."""
