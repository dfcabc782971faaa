#!/usr/bin/env bash
# Stop the local stack started by infra/local/start.sh (only its own processes; data is kept).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
exec "${PYTHON:-$here/.venv/bin/python}" -m pipelines.stack stop "$@"
