"""The ClusterCAM network, its config and its weights (load, export, ImageNet init)."""

from system.model.config import ClusterCAMConfig
from system.model.network import ClusterCAM, ClusterCAMOutput, Features, P2PRecord, build_clustercam, num_parameters
from system.model.weights import (
    CheckpointError,
    export_model,
    infer_config,
    init_from_deit,
    load_clustercam,
    read_state_dict,
)

__all__ = [
    "CheckpointError",
    "ClusterCAM",
    "ClusterCAMConfig",
    "ClusterCAMOutput",
    "Features",
    "P2PRecord",
    "build_clustercam",
    "export_model",
    "infer_config",
    "init_from_deit",
    "load_clustercam",
    "num_parameters",
    "read_state_dict",
]
