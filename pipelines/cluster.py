"""Joining or starting Ray, the same way for every entry point."""

from __future__ import annotations

import os

from pipelines.entry import BadInput
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


def wait_placed(actors: list, refs: list, timeout_s: float, what: str, asks: dict[str, float]) -> list:
    """``ray.get(refs)`` of the first call to each of ``actors``, but bounded: an actor the cluster
    cannot place waits forever in Ray, so after ``timeout_s`` this kills the pool and raises
    ``BadInput`` naming the resources each actor asked for and what the cluster has. Long enough for
    an autoscaler to add nodes; short enough that a job asking for GPUs no node offers stops instead
    of hanging."""
    import ray

    _ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        for actor in actors:
            ray.kill(actor)
        asked = ", ".join(f"{k}={v:g}" for k, v in asks.items() if v)
        have = ", ".join(f"{k}={v:g}" for k, v in sorted(ray.cluster_resources().items()) if k in ("CPU", "GPU"))
        raise BadInput(
            f"{len(pending)} of {len(refs)} {what} could not be placed within {timeout_s:g} s: each asks for "
            f"{asked}; the cluster has {have or 'nothing'} in all. Give the cluster nodes with these resources (an "
            "autoscaling cluster: a worker group that offers them, with room under its maximum), or ask for less "
            "(gpus_per_actor=0 labels on CPUs)"
        )
    return ray.get(refs)
