"""The ClusterCAM network, its config, its kinds (head variants) and its weights (load, export, ImageNet init)."""

from system.model.config import ClusterCAMConfig
from system.model.network import ClusterCAM, ClusterCAMOutput, Features, P2PRecord, build_clustercam, num_parameters
from system.model.spec import (
    DEFAULT_KIND,
    MODEL_SPECS,
    CheckpointError,
    ModelSpec,
    build_model,
    infer_config,
    loss_metric_term,
    recognise,
)
from system.model.weights import export_model, init_from_deit, load_clustercam, read_state_dict

__all__ = [
    "DEFAULT_KIND",
    "MODEL_SPECS",
    "CheckpointError",
    "ClusterCAM",
    "ClusterCAMConfig",
    "ClusterCAMOutput",
    "Features",
    "ModelSpec",
    "P2PRecord",
    "build_clustercam",
    "build_model",
    "export_model",
    "infer_config",
    "init_from_deit",
    "load_clustercam",
    "loss_metric_term",
    "num_parameters",
    "read_state_dict",
    "recognise",
]
