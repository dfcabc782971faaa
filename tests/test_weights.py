"""Loading the authors' checkpoints in every wrapping, exporting model directories, ImageNet init."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from system import storage
from system.model import (
    MODEL_SPECS,
    CheckpointError,
    ClusterCAMConfig,
    build_clustercam,
    build_model,
    export_model,
    infer_config,
    init_from_deit,
    load_clustercam,
    recognise,
)
from tests.golden import authors_state_dict, golden


@pytest.fixture(scope="module")
def authors_sd():
    return authors_state_dict()


def _same_outputs(a, b, x) -> bool:
    with torch.no_grad():
        return all(torch.equal(u, v) for u, v in zip(a(x), b(x)))


def test_config_is_inferred_from_tensors(authors_sd):
    cfg = infer_config(authors_sd)
    assert cfg == {
        "head": "authors",
        "num_classes": 5,
        "embed_dim": 48,
        "depth": 12,
        "num_heads": 6,
        "mlp_ratio": 4.0,
        "patch_size": 16,
        "img_size": 96,
        "st_depth": None,
        "qkv_bias": True,
        "decoder_channels": 512,
    }


@pytest.mark.parametrize("wrap", ["plain", "model", "module_prefix", "model_and_prefix"])
def test_authors_checkpoint_wrappings_load_strictly(tmp_path, authors_sd, wrap):
    sd = {("module." + k if "prefix" in wrap else k): v for k, v in authors_sd.items()}
    obj = {"model": sd, "epoch": 3} if wrap.startswith("model") else sd
    path = tmp_path / "ClusterCAM_VOC.pth"
    torch.save(obj, path)
    model = load_clustercam(str(path))
    assert not model.training
    reference = load_clustercam(authors_sd)
    assert _same_outputs(model, reference, golden("x"))


def test_safetensors_file_and_overrides(tmp_path, authors_sd):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in authors_sd.items()}, path)
    model = load_clustercam(str(path), n_iter=2, drop_path_rate=0.0)
    assert model.cfg.n_iter == 2
    assert torch.equal(model.state_dict()["head.weight"], authors_sd["head.weight"])


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match="tensors only"):
        load_clustercam(str(path))


def test_bad_checkpoints_name_the_problem(tmp_path, authors_sd):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clustercam(str(missing))
    truncated = tmp_path / "truncated.pth"
    buf = io.BytesIO()
    torch.save(authors_sd, buf)
    truncated.write_bytes(buf.getvalue()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_clustercam(str(truncated))
    partial = dict(authors_sd)
    del partial["blocks.3.st_attn.mix_param"]
    with pytest.raises(CheckpointError, match="mix_param"):
        load_clustercam(partial)
    with pytest.raises(CheckpointError, match="missing cls_token"):
        load_clustercam({"pos_embed": authors_sd["pos_embed"]})


def test_export_roundtrip_local_dir(tmp_path):
    model = build_clustercam(num_classes=3, embed_dim=48, img_size=64, n_iter=2).eval()
    export_model(model, str(tmp_path / "model"), class_names=["a", "b", "c"], run_id="run-1")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_clustercam(str(tmp_path / "model"))
    assert loaded.cfg == model.cfg  # model.json carries what tensors cannot (n_iter)
    assert loaded.class_names == ["a", "b", "c"] and loaded.source_id == "run-1"
    assert _same_outputs(model, loaded, torch.randn(1, 3, 64, 80))


def test_export_and_load_through_s3(s3_root):
    model = build_clustercam(num_classes=2, embed_dim=48, img_size=64).eval()
    dest = storage.join(s3_root, "runs", "r", "model")
    export_model(model, dest, class_names=["cat", "dog"], run_id="r")
    assert storage.exists(storage.join(dest, "model.json"))
    loaded = load_clustercam(dest)
    assert loaded.class_names == ["cat", "dog"]
    assert _same_outputs(model, loaded, torch.randn(2, 3, 64, 64))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict()}, buf)
    storage.put_bytes(storage.join(s3_root, "ckpt.pth"), buf.getvalue())
    assert _same_outputs(model, load_clustercam(storage.join(s3_root, "ckpt.pth")), torch.randn(1, 3, 64, 64))


def _tiny_deit(distilled: bool = False) -> dict[str, torch.Tensor]:
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=6, num_classes=1000)
    torch.nn.init.normal_(vit.cls_token)
    torch.nn.init.normal_(vit.pos_embed)
    sd = vit.state_dict()
    if distilled:  # DeiT-distilled layout: cls + dist rows in front of the grid
        sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.randn(1, 1, 48), sd["pos_embed"][:, 1:]], dim=1)
        sd["dist_token"] = torch.randn(1, 1, 48)
    return sd


@pytest.mark.parametrize("distilled", [False, True])
def test_imagenet_init_follows_the_spec(tmp_path, distilled):
    deit = _tiny_deit(distilled)
    path = tmp_path / "deit.pth"
    torch.save({"model": deit}, path)
    model = build_clustercam(num_classes=4, embed_dim=48, img_size=64)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    untouched = init_from_deit(model, str(path))
    sd = model.state_dict()
    assert torch.equal(sd["cls_token"], deit["cls_token"].repeat(1, 4, 1))
    assert torch.equal(sd["pos_embed"][:, :4], deit["pos_embed"][:, :1].repeat(1, 4, 1))
    assert torch.equal(sd["pos_embed"][:, 4:], deit["pos_embed"][:, -16:])
    for i in (0, 11):
        for ln in ("ln_pat", "ln_pat2", "ln_cls", "ln_st"):
            assert torch.equal(sd[f"blocks.{i}.st_attn.{ln}.weight"], deit[f"blocks.{i}.norm1.weight"])
        for dst in ("qkv", "qkv_stsa"):
            assert torch.equal(sd[f"blocks.{i}.st_attn.{dst}.bias"], deit[f"blocks.{i}.attn.qkv.bias"])
        for dst in ("proj", "proj_cls"):
            assert torch.equal(sd[f"blocks.{i}.st_attn.{dst}.weight"], deit[f"blocks.{i}.attn.proj.weight"])
        assert torch.equal(sd[f"blocks.{i}.mlp.fc2.weight"], deit[f"blocks.{i}.mlp.fc2.weight"])
    assert torch.equal(sd["patch_embed.proj.weight"], deit["patch_embed.proj.weight"])
    assert torch.equal(sd["norm.weight"], deit["norm.weight"])
    for key in ("blocks.0.st_attn.proj_st.weight", "blocks.5.st_attn.mix_param", "head.weight", "decoder.conv6.weight"):
        assert key in untouched and torch.equal(sd[key], fresh[key])


def test_imagenet_init_resamples_another_grid_and_rejects_another_width():
    deit = _tiny_deit()
    model = build_clustercam(num_classes=2, embed_dim=48, img_size=96)  # 6x6 grid from a 4x4 one
    init_from_deit(model, deit)
    assert model.pos_embed.shape == (1, 2 + 36, 48)
    wide = build_clustercam(num_classes=2, embed_dim=96, num_heads=6, img_size=64)
    with pytest.raises(CheckpointError, match="width 48"):
        init_from_deit(wide, deit)


SMALL = {"num_classes": 3, "embed_dim": 48, "img_size": 64}


@pytest.mark.parametrize("kind", sorted(MODEL_SPECS))
def test_every_model_kind_recognises_exactly_its_own_checkpoints(kind):
    keys = build_model(ClusterCAMConfig(head=kind, **SMALL)).state_dict().keys()
    assert [spec.kind for spec in MODEL_SPECS.values() if spec.recognises(keys)] == [kind]


@pytest.mark.parametrize("kind", sorted(MODEL_SPECS))
def test_every_model_kind_reads_its_config_off_its_tensors_and_survives_export(tmp_path, kind):
    cfg = ClusterCAMConfig(head=kind, **SMALL)
    model = build_model(cfg).eval()
    assert ClusterCAMConfig(**infer_config(model.state_dict())) == cfg
    export_model(model, str(tmp_path / "model"))
    assert json.loads((tmp_path / "model" / "model.json").read_text())["config"]["head"] == kind
    loaded = load_clustercam(str(tmp_path / "model"))
    assert type(loaded) is type(model) and loaded.cfg == cfg
    assert _same_outputs(model, loaded, torch.randn(1, 3, 64, 64))


def test_an_imagenet_deit_checkpoint_is_no_model_kind():
    assert recognise(_tiny_deit()) is None and recognise(_tiny_deit(distilled=True)) is None


def test_an_export_without_a_recorded_kind_is_recognised_from_its_tensors(tmp_path):
    model = build_clustercam(num_classes=2, embed_dim=48, img_size=64, n_iter=2).eval()
    export_model(model, str(tmp_path / "model"))
    meta_path = tmp_path / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["head"]  # exported before the field existed
    meta_path.write_text(json.dumps(meta))
    loaded = load_clustercam(str(tmp_path / "model"))
    assert loaded.cfg == model.cfg and loaded.cfg.head == "authors"


def test_an_export_naming_its_kind_under_the_old_field_loads_as_that_head(tmp_path):
    model = build_clustercam(num_classes=2, embed_dim=48, img_size=64, n_iter=2).eval()
    export_model(model, str(tmp_path / "model"))
    meta_path = tmp_path / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["kind"] = meta["config"].pop("head")  # written before the field was renamed
    meta_path.write_text(json.dumps(meta))
    assert load_clustercam(str(tmp_path / "model")).cfg == model.cfg


def test_a_model_json_naming_an_unknown_kind_is_a_clear_error(tmp_path):
    export_model(build_clustercam(num_classes=2, embed_dim=48, img_size=64), str(tmp_path / "model"))
    meta_path = tmp_path / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["head"] = "huge"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model'?: unknown model.head 'huge' \(choices: authors, scalable\)"):
        load_clustercam(str(tmp_path / "model"))


def test_a_config_naming_an_unknown_head_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"model.head 'huge' is not a known head \(choices: authors, scalable\)"):
        ClusterCAMConfig(head="huge")


def test_a_scalable_state_dict_without_model_json_loads_as_the_scalable_head_bit_exactly():
    model = build_clustercam(num_classes=7, embed_dim=48, img_size=64, head="scalable", head_tokens=2).eval()
    loaded = load_clustercam(model.state_dict())
    assert loaded.cfg == model.cfg and loaded.cfg.head == "scalable" and loaded.cfg.head_tokens == 2
    assert _same_outputs(model, loaded, torch.randn(2, 3, 64, 48))
    assert torch.equal(model.cam(torch.ones(1, 3, 64, 64)), loaded.cam(torch.ones(1, 3, 64, 64)))


def test_imagenet_init_of_the_scalable_head_fills_its_shared_tokens_and_leaves_the_class_layers_fresh():
    model = build_clustercam(num_classes=30, embed_dim=48, img_size=64, head="scalable", head_tokens=2)
    deit = _tiny_deit()
    fresh = set(init_from_deit(model, deit))
    assert {"head.weight", "cls_head.weight", "cls_head.bias", "decoder.conv6.weight"} <= fresh
    assert torch.equal(model.cls_token, deit["cls_token"].repeat(1, 2, 1))
