#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh: every process it started, found by session, and only
# those; its data, credentials and Ray logs (<dir>/ray-logs) are kept, and start.sh brings it back on them.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
exec "${PYTHON:-$here/.venv/bin/python}" -m pipelines.stack stop "$@"
