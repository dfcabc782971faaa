#!/usr/bin/env bash
# Start the local stack (SeaweedFS S3 on loopback + a Ray head), then print how to use it.
#   infra/local/start.sh [--no-ray] [--dir DIR] [--bucket NAME]
# Afterwards: eval "$(infra/local/env.sh)"  and use s3://clustercam/... as <root>.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
ray_flag="--ray"
args=()
for a in "$@"; do
  if [[ "$a" == "--no-ray" ]]; then ray_flag=""; else args+=("$a"); fi
done
cd "$here"
exec "$py" -m pipelines.stack start $ray_flag "${args[@]}"
