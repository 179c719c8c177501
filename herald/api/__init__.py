"""The HTTP edge, put together by `app.create_app`: the routes (`routes`, the in-app inbox's in `inbox`),
error answers (`errors`), middleware (`middleware`, `security`), idempotency, rq-dashboard at `/rq` and
the MCP tools at `/mcp`. Nothing worker-side imports this package."""
