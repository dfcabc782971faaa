#!/usr/bin/env bash
# Print the AWS_*/RAY_* exports of the running local stack: eval "$(infra/local/env.sh)"
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$here"
exec "${PYTHON:-$here/.venv/bin/python}" -m pipelines.stack env "$@"
