"""Loading, exporting and ImageNet-initialising ClusterCAM weights.

A checkpoint is data, never code: ``.pth`` files load with ``torch.load(weights_only=True)``, exported
models are safetensors. An exported model's ``model.json`` says which kind of network it is and
its config; without one (the authors' released checkpoints) the kind is recognised and the config
read off the tensors (system/model/spec.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from timm.layers import resample_abs_pos_embed

from system.model.config import ClusterCAMConfig
from system.model.network import ClusterCAM
from system.model.spec import DEFAULT_KIND, MODEL_SPECS, CheckpointError, get_spec, recognise

MODEL_FILE = "model.safetensors"
MODEL_JSON = "model.json"
EXPORT_FORMAT_VERSION = 1


def _is_remote(src: str) -> bool:
    return src.startswith("s3://")


def _read_bytes(src: str) -> bytes:
    if _is_remote(src):
        from system import storage

        return storage.get_bytes(src)
    path = Path(src.removeprefix("file://"))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {src!r} does not exist")
    return path.read_bytes()


def _join(src: str, name: str) -> str:
    return src.rstrip("/") + "/" + name


def _is_model_dir(src: str) -> bool:
    if _is_remote(src):
        from system import storage

        return storage.exists(_join(src, MODEL_JSON))
    return Path(src.removeprefix("file://"), MODEL_JSON).is_file()


def _decode_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        try:
            return safetensors_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {name!r} is not a valid safetensors file: {exc}") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {name!r} cannot be read as tensors only: {exc}") from exc
    return unwrap_state_dict(obj, name)


def unwrap_state_dict(obj: Any, name: str = "state dict") -> dict[str, torch.Tensor]:
    """Accept ``{"model": sd}`` / ``{"state_dict": sd}`` wrappers and ``module.`` prefixes."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{name} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(src: str | Mapping) -> dict[str, torch.Tensor]:
    """Tensors from a state dict, a file path, an ``s3://`` URI or an exported model directory."""
    if isinstance(src, Mapping):
        return unwrap_state_dict(src)
    src = str(src)
    if _is_model_dir(src):
        src = _join(src, MODEL_FILE)
    return _decode_tensors(_read_bytes(src), src)


def load_clustercam(src: str | Path | Mapping, **overrides) -> ClusterCAM:
    """A network in eval mode from a path, ``s3://`` URI, exported model dir or state dict.

    Its kind (``model.head``) is the one ``model.json`` names, else the one that recognises the tensors
    (the authors' when none does, whose config reader then names what is missing). The config is read
    off the tensors, then ``model.json``'s wins; ``overrides`` set ClusterCAMConfig fields the
    tensors cannot tell (``grid``, ``n_iter``, ``drop_path_rate``, ``decoder_dilation``). Loading is
    strict: every key must match.
    """
    meta: dict[str, Any] = {}
    if not isinstance(src, Mapping) and _is_model_dir(str(src)):
        meta = json.loads(_read_bytes(_join(str(src), MODEL_JSON)))
    sd = read_state_dict(src)
    name = "state dict" if isinstance(src, Mapping) else repr(str(src))
    saved = dict(meta.get("config", {}))
    if "kind" in saved:  # exports before the scalable head named the field ``kind``
        saved.setdefault("head", saved.pop("kind"))
    kind = overrides.get("head", saved.get("head"))
    try:
        spec = get_spec(kind) if kind is not None else recognise(sd, name) or MODEL_SPECS[DEFAULT_KIND]
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    fields = {**spec.infer_config(sd, name), **saved, **overrides, "head": spec.kind}
    if "grid" in fields:
        fields["grid"] = tuple(fields["grid"])
    try:
        cfg = ClusterCAMConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    model = spec.build(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name} does not match the {spec.kind} model's layout: {exc}") from exc
    model.class_names = meta.get("class_names")
    model.source_id = meta.get("run_id")
    model.cam_settings = meta.get("cam", {})  # how training made its CAMs: {"layers", "p2p_refine"}
    return model.eval()


def export_model(
    model: ClusterCAM,
    dest: str,
    class_names: list[str] | None = None,
    run_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write an exported model directory: ``model.safetensors`` then ``model.json`` (last), whose
    ``config`` records the model's kind (``head``) and every shape option, so loading it needs no guessing.

    ``state_dict`` replaces ``model.state_dict()`` when the weights live elsewhere (e.g. a ZeRO-3
    consolidation); keys are the authors' names either way.
    """
    from system import storage

    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if class_names is not None and len(class_names) != model.cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.cfg.num_classes}-class model")
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "config": dataclasses.asdict(model.cfg),
        "class_names": list(class_names) if class_names is not None else None,
        "run_id": run_id,
        **(extra or {}),
    }
    storage.put_bytes(_join(dest, MODEL_FILE), safetensors_save(tensors))
    storage.put_bytes(_join(dest, MODEL_JSON), json.dumps(meta, indent=1).encode())


def deit_to_clustercam(deit: Mapping[str, torch.Tensor], cfg: ClusterCAMConfig) -> dict[str, torch.Tensor]:
    """Map an ImageNet DeiT/ViT state dict onto ClusterCAM keys (docs/method.md §b.2).

    The single class token (and its position row) is repeated once per backbone token (K for the
    authors' head, ``head_tokens`` for the scalable one); each clustering block's
    four LayerNorms take DeiT's ``norm1``, both qkv projections DeiT's ``attn.qkv`` and both output
    projections ``attn.proj``; ``proj_st``, ``mix_param``, heads and decoder are left out (they keep
    their fresh initialisation).
    """
    K, C, G = cfg.num_tokens, cfg.embed_dim, cfg.pos_grid
    if "cls_token" not in deit or "pos_embed" not in deit:
        raise CheckpointError("DeiT checkpoint lacks cls_token / pos_embed")
    if deit["cls_token"].shape[-1] != C:
        raise CheckpointError(f"DeiT width {deit['cls_token'].shape[-1]} differs from the model's {C}")
    out: dict[str, torch.Tensor] = {"cls_token": deit["cls_token"][:, :1].repeat(1, K, 1)}
    rows = deit["pos_embed"].shape[1]
    src_grid = math.isqrt(rows - 1)
    prefix = rows - src_grid * src_grid  # 1 (DeiT) or 2 (distilled DeiT: cls + dist token)
    patch_pos = deit["pos_embed"][:, prefix:]
    if src_grid != G:
        patch_pos = resample_abs_pos_embed(patch_pos, (G, G), (src_grid, src_grid), num_prefix_tokens=0)
    out["pos_embed"] = torch.cat([deit["pos_embed"][:, :1].repeat(1, K, 1), patch_pos], dim=1)
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
        if key in deit:
            out[key] = deit[key]
    first_st = cfg.depth - cfg.num_st_blocks
    for i in range(cfg.depth):
        src = f"blocks.{i}."
        for part in ("norm2", "mlp.fc1", "mlp.fc2"):
            for t in ("weight", "bias"):
                if src + f"{part}.{t}" in deit:
                    out[src + f"{part}.{t}"] = deit[src + f"{part}.{t}"]
        if i < first_st:
            for part in ("norm1", "attn.qkv", "attn.proj"):
                for t in ("weight", "bias"):
                    if src + f"{part}.{t}" in deit:
                        out[src + f"{part}.{t}"] = deit[src + f"{part}.{t}"]
            continue
        dst = src + "st_attn."
        copies = {
            "norm1": ("ln_pat", "ln_pat2", "ln_cls", "ln_st"),
            "attn.qkv": ("qkv", "qkv_stsa"),
            "attn.proj": ("proj", "proj_cls"),
        }
        for part, targets in copies.items():
            for t in ("weight", "bias"):
                if src + f"{part}.{t}" in deit:
                    for target in targets:
                        out[dst + f"{target}.{t}"] = deit[src + f"{part}.{t}"].clone()
    return out


def init_from_deit(model: ClusterCAM, src: str | Path | Mapping) -> list[str]:
    """Load ImageNet DeiT weights into a freshly initialised model (non-strict, docs/method.md §b.2).

    Returns the model keys left at their fresh initialisation. A tensor whose shape differs from the
    model's is an error naming it (a wrong backbone size must not load silently).
    """
    deit = read_state_dict(src) if not isinstance(src, Mapping) else unwrap_state_dict(src)
    mapped = deit_to_clustercam(deit, model.cfg)
    own = model.state_dict()
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"DeiT tensor for {key} has shape {tuple(value.shape)}, model has {tuple(own[key].shape)}"
            )
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected:
        raise CheckpointError(f"unexpected keys after DeiT mapping: {unexpected}")
    return list(missing)
