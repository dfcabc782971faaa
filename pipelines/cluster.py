"""Joining or starting Ray, the same way for every entry point."""

from __future__ import annotations

import os


def start_ray(env_vars: dict[str, str] | None = None):
    """Join the cluster this process belongs to, or start a local Ray.

    Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) the driver joins that cluster; otherwise a
    local Ray starts, with its dashboard as ``ray.init()`` gives it: Ray Train's placement-group
    cleaner asks the dashboard's state API every second whether the run is alive, and without one it
    logs a failure each time for the whole run. ``env_vars`` (e.g. the AWS settings) go to every worker
    through the job's runtime environment: workers take their environment from the raylet, not from
    the driver.
    """
    import ray

    if not ray.is_initialized():
        runtime_env = {"env_vars": env_vars} if env_vars else None
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto", runtime_env=runtime_env, log_to_driver=True)
        else:
            ray.init(runtime_env=runtime_env)
    return ray
