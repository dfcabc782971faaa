#!/usr/bin/env bash
# Build (and with --push, push) the cluster image. IMAGE is the name every manifest in infra/ uses;
# set IMAGE=registry.example.com/clustercam:tag to build for your registry, then edit the manifests.
set -euo pipefail
IMAGE="${IMAGE:-clustercam/clustercam:0.1.0}"
cd "$(dirname "$0")/../.."
DOCKER_BUILDKIT=1 docker build -f infra/docker/Dockerfile -t "$IMAGE" .
if [[ "${1:-}" == "--push" ]]; then docker push "$IMAGE"; fi
echo "$IMAGE"
