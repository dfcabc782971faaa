"""Our ClusterCAM against tensors produced by the authors' own code (tests/golden, set A)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from system.cam import multi_scale_cam, predict_probs
from system.losses import clustercam_loss
from system.metrics import ConfusionMatrix
from system.model import P2PRecord, load_clustercam
from system.model.network import soft_kmeans
from system.refine import PAR, cam_to_label, denormalize, pseudo_labels
from tests.golden import GOLDEN_A, assert_rel, authors_state_dict, golden


@pytest.fixture(scope="module")
def model():
    return load_clustercam(authors_state_dict())


@pytest.fixture(scope="module")
def x():
    return golden("x")


@pytest.fixture(scope="module")
def labels():
    return golden("cls_label")


def test_state_dict_keys_are_the_authors(model):
    expected = [line.split("\t")[0] for line in (GOLDEN_A / "state_dict_keys.txt").read_text().splitlines() if line]
    assert list(model.state_dict().keys()) == expected


def test_input_and_denormalisation(x):
    image = golden("image_uint8").permute(0, 3, 1, 2).float() / 255
    assert_rel(denormalize(x), golden("x_denorm"))
    # truncation toward zero, as the authors cast: at most one grey level below the original
    assert float((image - denormalize(x)).max()) <= 1 / 255 + 1e-6


def test_pos_embed_interpolation(model):
    for size, expected in golden("pos_embed_interp").items():
        h, w = map(int, size.split("x"))
        assert_rel(model.interpolate_pos_embed(h, w).detach(), expected)


@torch.no_grad()
def test_block0_internals(model, x):
    ref = golden("block0_internals")
    st = model.blocks[0].st_attn
    K = model.cfg.num_classes
    tokens = torch.cat([model.cls_token, model.patch_embed(x)], dim=1) + model.pos_embed
    assert_rel(tokens, ref["block0_input"])
    inp = ref["block0_input"]
    assert_rel(st.proj_st(inp[:, K:]), ref["proj_st_out"])
    feats = st.ln_pat2(st.proj_st(inp[:, K:]))
    assert_rel(feats, ref["ln_pat2_out"])
    for it in range(1, 4):
        assoc, stokens = soft_kmeans(feats, (6, 6), (2, 2), it)
        assert_rel(assoc, ref["asso_iters"][it - 1])
    assert_rel(stokens, ref["stokens_final"])
    assert_rel(st.ln_st(stokens), ref["ln_st_out"])
    assert_rel(st.ln_cls(inp[:, :K]), ref["ln_cls_out"])
    z = torch.cat([ref["ln_cls_out"], ref["ln_st_out"]], dim=1)
    assert_rel(st.qkv_stsa(z), ref["qkv_stsa_out"])
    for record in (P2PRecord.NONE, P2PRecord.FULL):
        out, c2p, p2p = model.blocks[0](inp, (6, 6), record)
        assert_rel(out, ref["block0_out"])
        o_std, o_st, _, _ = st(inp, (6, 6), record)
        assert_rel(inp + o_std + o_st, ref["st_attn_out_x"])


@torch.no_grad()
def test_forward_features(model, x):
    ref = golden("forward_features")
    outputs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o[0])) for blk in model.blocks]
    try:
        feats = model.forward_features(x, P2PRecord.FULL)
    finally:
        for h in hooks:
            h.remove()
    assert_rel(feats.x_cls, ref["x_cls"])
    assert_rel(feats.x_patch, ref["x_patch"])
    assert_rel(feats.p2p, ref["p2p"])
    assert_rel(feats.c2p.transpose(0, 1), ref["c2p"])
    assert_rel(torch.stack(outputs), ref["block_outputs"])


@torch.no_grad()
def test_forward(model, x):
    ref = golden("forward")
    out = model(x)
    assert_rel(out.cls_logits, ref["cls_logits"])
    assert_rel(out.pat_logits, ref["pat_logits"])
    assert_rel(out.segs, ref["segs"])
    assert model(x, with_seg=False).segs is None


@torch.no_grad()
def test_cam_variants(model, x):
    ref = golden("cam_only")
    assert_rel(model.cam(x), ref["default"])
    assert_rel(model.cam(x, p2p_refine=False), ref["p2p_refine_false"])
    assert_rel(model.cam(x, n_layers=1, p2p_refine=False), ref["n_layers1_p2p_refine_false"])


def test_multi_scale_cams(model, x):
    ref = golden("multi_scale_cam2")
    assert_rel(multi_scale_cam(model, x, [1.0, 0.5, 1.5]), ref["scales_1_0_5_1_5"])
    assert_rel(multi_scale_cam(model, x, [1.0, 0.75, 1.25]), ref["scales_1_0_75_1_25"])


def test_cam_to_label(labels):
    ref = golden("cam_to_label")
    cams = golden("multi_scale_cam2")["scales_1_0_5_1_5"]
    assert_rel(cam_to_label(cams, labels), ref["valid_cam"])


def test_par():
    ref = golden("par")
    assert_rel(PAR()(ref["imgs"], ref["masks_in"]), ref["masks_out"])


def test_refined_pseudo_labels(labels):
    cams = golden("cam_to_label")["valid_cam"]
    out = pseudo_labels(golden("x_denorm"), cams, labels, bg_threshold=0.4, ignore_delta=0.1)
    assert out.dtype == torch.int64
    assert torch.equal(out, golden("refined_label").long())


def test_losses_and_gradients(x, labels):
    ref = golden("losses")
    model = load_clustercam(authors_state_dict(), drop_path_rate=0.0).train()
    out = model(x)
    losses = clustercam_loss(out.cls_logits, out.pat_logits, labels, out.segs, golden("refined_label").long())
    assert_rel(losses.cls.detach(), ref["closs"])
    assert_rel(losses.pat.detach(), ref["ploss"])
    assert_rel(losses.seg.detach(), ref["sloss"])
    assert_rel(losses.total.detach(), ref["loss"])
    losses.total.backward()
    params = dict(model.named_parameters())
    for name, grad in ref["grads"].items():
        assert_rel(params[name].grad, grad)


def test_inference_probs(model, x):
    ref = golden("infer_e2e")
    probs = predict_probs(model, x)
    assert_rel(probs, ref["probs"])
    assert torch.equal(probs.argmax(dim=1), ref["pred"])


def test_prediction_png_is_the_authors_bytes_decoded():
    ref = golden("infer_e2e")["pred_crf"][0].numpy()
    png = np.asarray(Image.open(io.BytesIO((GOLDEN_A / "infer_pred_0.png").read_bytes())))
    assert np.array_equal(png, ref.astype(np.uint8))


@pytest.mark.parametrize("name", ["evaluator", "evaluator_shifted"])
def test_evaluator(name):
    gt = golden("gt_mask")
    if name == "evaluator":
        pred = golden("infer_e2e")["pred_crf"]
    else:
        pred = torch.from_numpy(np.roll(gt.numpy(), 3, axis=2)).long()
        pred[pred == 255] = 0
    cm = ConfusionMatrix(golden("cls_label").shape[1] + 1)
    for g, p in zip(gt, pred):
        cm.add(g, p)
    ref = golden(name)
    assert np.array_equal(cm.matrix, ref["confusion_matrix"].numpy())
    np.testing.assert_allclose(cm.iou(), ref["iou"].numpy(), rtol=1e-12, equal_nan=True)
    assert cm.miou() == pytest.approx(ref["miou"].item(), rel=1e-12)
