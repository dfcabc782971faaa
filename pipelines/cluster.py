"""Joining or starting Ray, the same way for every entry point."""

from __future__ import annotations

import os

from system import storage


def start_ray():
    """Join the cluster this process belongs to, or start a local Ray.

    Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) the driver joins that cluster; otherwise a
    local Ray starts, with its dashboard as ``ray.init()`` gives it: Ray Train's placement-group
    cleaner asks the dashboard's state API every second whether the run is alive, and without one it
    logs a failure each time for the whole run.

    Workers take their environment from their node's raylet, not from the driver, so the job carries
    the driver's non-secret storage settings (endpoint, region) in its runtime environment. Never the
    credentials: Ray's runtime-env agent logs every runtime environment and the dashboard shows it, so
    each node brings its own (the local stack starts its Ray head with them; a cluster has a Secret,
    IRSA or an instance profile; a local ``ray.init()`` is a child of this process and inherits them).
    """
    import ray

    if not ray.is_initialized():
        settings = storage.aws_settings()
        runtime_env = {"env_vars": settings} if settings else None
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto", runtime_env=runtime_env, log_to_driver=True)
        else:
            ray.init(runtime_env=runtime_env)
    return ray
