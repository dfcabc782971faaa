"""Model kinds: what differs between head variants, in one registry entry each.

A *kind* names a network variant, chosen by ``model.head`` (``ClusterCAMConfig.head``): ``"authors"``,
the paper's network, is the default; ``"scalable"`` is the head for large vocabularies
(system/model/scalable.py). Its :class:`ModelSpec` is the one place the rest of the system asks about
it: how to build it from a config, how to recognise its checkpoints when they come without
``model.json``, how to read its config off the tensors, and the names of its loss terms (the keys of a
training row in ``history.jsonl`` and the ``term`` label of ``clustercam_train_loss``; the Grafana
dashboard groups by that label, so it needs no change). An exported model records its kind in
``model.json`` (``config.head``; exports before the scalable head wrote ``config.kind``), so
``load_clustercam`` builds the right network without guessing; recognition is the fallback for the
authors' released ``.pth`` files and for exports older than the field.

Adding a head (the scalable head was added this way):

1. Write its network. The trainer, the CAM code and the labeller use the interface of
   ``ClusterCAM`` (``cfg``, ``forward(x, with_seg, task="logits" | "cam" | "segment")`` returning
   ``ClusterCAMOutput`` / CAMs / decoder logits, ``head.weight`` for the CAM), so subclassing it and
   replacing the parts that change is the short way.
2. Give any new shape option a field in ``ClusterCAMConfig`` whose default leaves the authors'
   network as it is (their checkpoints must stay golden-exact: tests/test_golden.py).
3. Add ``"<name>": ModelSpec(...)`` to ``MODEL_SPECS`` below, with a ``recognises`` that accepts
   only its own state dicts (a subclass's keys are usually a superset of the authors', so tighten
   ``_is_authors`` if they would also match: ambiguity is an error) and an ``infer_config`` that
   reads its shape off its tensors.
4. If its objective differs, its loss goes next to the authors' one (``compute_loss``) and
   ``loss_terms`` lists the terms it reports.

Training then selects it with ``model.head: <name>``; tests/test_weights.py checks every entry of
``MODEL_SPECS`` (recognised as itself only, config read back from its tensors, export round trip).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from system.model.config import ClusterCAMConfig
from system.model.network import ClusterCAM
from system.model.scalable import ScalableClusterCAM

DEFAULT_KIND = "authors"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit; the message names the source."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str
    build: Callable[[ClusterCAMConfig], nn.Module]  # a freshly initialised network
    recognises: Callable[[Collection[str]], bool]  # state-dict keys -> "this is one of mine"
    infer_config: Callable[[Mapping[str, torch.Tensor], str], dict[str, Any]]  # (tensors, source name) -> fields
    loss_terms: tuple[str, ...]  # "loss" (the total) first, then "loss_<term>"


def loss_metric_term(name: str) -> str:
    """The ``term`` label of ``clustercam_train_loss`` for a loss name: "loss" -> "total", "loss_cls" -> "cls"."""
    return "total" if name == "loss" else name.removeprefix("loss_")


def _block_indices(sd: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def _is_clustercam(keys: Collection[str]) -> bool:
    """A conv head over FEAT plus the LargeFOV decoder or clustering blocks: an ImageNet DeiT has neither."""
    return "head.weight" in keys and ("decoder.conv6.weight" in keys or any(".st_attn." in k for k in keys))


def _is_authors(keys: Collection[str]) -> bool:
    return _is_clustercam(keys) and "cls_head.weight" not in keys


def _is_scalable(keys: Collection[str]) -> bool:
    """The scalable head's class layer ``cls_head`` is what the authors' network lacks."""
    return _is_clustercam(keys) and "cls_head.weight" in keys


def _authors_config(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, Any]:
    """The authors' network's shape read off its tensors: classes, width, depth, heads, patch, pos grid, ...

    Its backbone carries one token per class; ``_scalable_config`` reuses this with T shared tokens.
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(f"{name} is not a ClusterCAM checkpoint: missing {', '.join(missing)}")
    _, K, C = sd["cls_token"].shape
    blocks = _block_indices(sd)
    depth = len(blocks)
    if blocks != list(range(depth)):
        raise CheckpointError(f"{name}: block indices {blocks} are not contiguous from 0")
    grid_cells = sd["pos_embed"].shape[1] - K
    G = math.isqrt(grid_cells)
    if G * G != grid_cells:
        raise CheckpointError(f"{name}: pos_embed holds {grid_cells} patch rows, not a square grid")
    patch = sd["patch_embed.proj.weight"].shape[-1]
    attn_width = sd["head.weight"].shape[1] - C
    if attn_width <= 0 or attn_width % (depth * K):
        raise CheckpointError(f"{name}: head input width {sd['head.weight'].shape[1]} is not {C} + depth*heads*{K}")
    st_blocks = [i for i in blocks if f"blocks.{i}.st_attn.qkv.weight" in sd]
    first = "blocks.0.st_attn.qkv.bias" if 0 in st_blocks else "blocks.0.attn.qkv.bias"
    cfg = {
        "num_classes": K,
        "embed_dim": C,
        "depth": depth,
        "num_heads": attn_width // (depth * K),
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / C,
        "patch_size": patch,
        "img_size": G * patch,
        "st_depth": None if len(st_blocks) == depth else len(st_blocks),
        "qkv_bias": first in sd,
    }
    if "decoder.conv6.weight" in sd:
        cfg["decoder_channels"] = sd["decoder.conv6.weight"].shape[0]
    return cfg


def _scalable_config(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, Any]:
    """The scalable network's shape: the backbone read as the authors' with T tokens, K from ``cls_head``."""
    if "cls_head.weight" not in sd:
        raise CheckpointError(f"{name} is not a scalable-head checkpoint: missing cls_head.weight")
    fields = _authors_config(sd, name)
    return {**fields, "num_classes": sd["cls_head.weight"].shape[0], "head_tokens": fields["num_classes"]}


MODEL_SPECS: dict[str, ModelSpec] = {
    "authors": ModelSpec(
        kind="authors",
        build=ClusterCAM,
        recognises=_is_authors,
        infer_config=_authors_config,
        loss_terms=("loss", "loss_cls", "loss_pat", "loss_seg"),
    ),
    "scalable": ModelSpec(
        kind="scalable",
        build=ScalableClusterCAM,
        recognises=_is_scalable,
        infer_config=_scalable_config,
        loss_terms=("loss", "loss_cls", "loss_pat", "loss_seg"),
    ),
}


def get_spec(kind: str) -> ModelSpec:
    try:
        return MODEL_SPECS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model.head {kind!r} (choices: {', '.join(MODEL_SPECS)})") from None


def recognise(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> ModelSpec | None:
    """The kind whose checkpoints look like ``sd``, or None (e.g. an ImageNet DeiT checkpoint)."""
    found = [spec for spec in MODEL_SPECS.values() if spec.recognises(sd.keys())]
    if len(found) > 1:
        kinds = ", ".join(spec.kind for spec in found)
        raise CheckpointError(f"{name} fits several model kinds ({kinds}); load it through a model.json naming one")
    return found[0] if found else None


def infer_config(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, Any]:
    """Model kind and shape read off the tensors; a state dict no kind recognises is read as the
    default kind's, whose reader names what is missing."""
    spec = recognise(sd, name) or MODEL_SPECS[DEFAULT_KIND]
    return {"head": spec.kind, **spec.infer_config(sd, name)}


def build_model(cfg: ClusterCAMConfig) -> nn.Module:
    """A freshly initialised network of ``cfg.head``."""
    return get_spec(cfg.head).build(cfg)
