#!/usr/bin/env bash
# Set up and run the whole service in the foreground; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh requirements.txt
exec python -m herald.serve "$@"
