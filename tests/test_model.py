"""The fast library against the naive transcription of docs/method.md (benchmarks/naive.py) on shapes
the golden set does not cover: other seeds, class counts, batch sizes, non-square and non-multiple-of-16 inputs."""

from __future__ import annotations

import pytest
import torch

from benchmarks.naive import (
    NaiveClusterCAM,
    NaivePAR,
    naive_denormalize,
    naive_multi_scale_cam,
    naive_predict_probs,
    naive_refine_cams_with_bkg,
    naive_seg_loss,
)
from system.cam import multi_scale_cam, predict_probs
from system.losses import clustercam_loss, seg_loss
from system.model import P2PRecord, build_clustercam
from system.refine import denormalize, pseudo_labels
from tests.golden import assert_rel

CASES = [
    # seed, classes, batch, height, width, pos-embed image size
    (1, 3, 2, 85, 118, 64),
    (2, 7, 3, 64, 64, 64),
    (3, 4, 1, 113, 70, 96),
]


def _rerandomise(model: torch.nn.Module, seed: int) -> None:
    """Larger-than-init weights so attention and clustering are far from uniform (as golden A)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_param"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.25)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5 * 1.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "ln" in name or "norm" in name else 0.0))


def _pair(seed: int, K: int, img_size: int):
    fast = build_clustercam(num_classes=K, embed_dim=48, img_size=img_size, drop_path_rate=0.0)
    _rerandomise(fast, seed)
    naive = NaiveClusterCAM(num_classes=K, embed_dim=48, img_size=img_size, drop_path_rate=0.0)
    naive.load_state_dict(fast.state_dict(), strict=True)
    return fast.eval(), naive.eval()


def _labels(B: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(B, K, generator=g) < 0.4).float()
    labels[torch.arange(B), torch.randint(0, K, (B,), generator=g)] = 1.0
    return labels


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"seed{c[0]}-K{c[1]}-B{c[2]}-{c[3]}x{c[4]}")
def case(request):
    seed, K, B, H, W, img_size = request.param
    fast, naive = _pair(seed, K, img_size)
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 0.8
    return fast, naive, x, _labels(B, K, seed)


@torch.no_grad()
def test_forward_and_cam_match_naive(case):
    fast, naive, x, _ = case
    out = fast(x)
    ref = naive(x)
    for a, b in zip(out, ref):
        assert_rel(a, b)
    for n_layers, refine in ((3, True), (3, False), (1, False), (12, True)):
        assert_rel(fast.cam(x, n_layers, refine), naive(x, cam_only=True, n_layers=n_layers, p2p_refine=refine))


@torch.no_grad()
def test_fused_and_explicit_attention_agree(case):
    fast, _, x, _ = case
    a = fast.forward_features(x, P2PRecord.NONE)
    b = fast.forward_features(x, P2PRecord.FULL)
    assert_rel(a.x_patch, b.x_patch)
    assert_rel(a.c2p, b.c2p)
    s = fast.forward_features(x, P2PRecord.SUM)
    assert_rel(s.p2p, b.p2p.mean(dim=2).sum(dim=0))


def test_multi_scale_cam_pseudo_labels_and_probs_match_naive(case):
    fast, naive, x, labels = case
    cams = multi_scale_cam(fast, x, (1.0, 0.75, 1.25))
    # min-max normalisation amplifies float32 rounding: against a float64 run both implementations
    # are off by ~3e-5 on these random weights, so 1e-5 between them would test noise
    assert_rel(cams, naive_multi_scale_cam(naive, x, (1.0, 0.75, 1.25)), tol=5e-5)
    images01 = denormalize(x)
    assert torch.equal(images01, naive_denormalize(x))
    ours = pseudo_labels(images01, cams, labels)
    theirs = naive_refine_cams_with_bkg(NaivePAR(), images01, cams * labels[..., None, None], labels, 0.5, 0.3)
    assert (ours == theirs).float().mean() >= 0.999  # exact up to float ties
    assert set(torch.unique(ours).tolist()) <= {0, 255, *range(1, labels.shape[1] + 1)}
    assert_rel(predict_probs(fast, x), naive_predict_probs(naive, x))


def test_loss_and_gradients_match_naive(case):
    fast, naive, x, labels = case
    pseudo = torch.randint(0, labels.shape[1] + 1, (x.shape[0], x.shape[2], x.shape[3]))
    pseudo[:, :5] = 255
    fast.train()
    naive.train()
    try:
        out = fast(x)
        loss = clustercam_loss(out.cls_logits, out.pat_logits, labels, out.segs, pseudo).total
        cls_logits, pat_logits, segs = naive(x)
        ref = (
            torch.nn.functional.multilabel_soft_margin_loss(cls_logits, labels)
            + torch.nn.functional.multilabel_soft_margin_loss(pat_logits, labels)
            + 0.1 * naive_seg_loss(torch.nn.functional.interpolate(segs, x.shape[-2:], mode="bilinear"), pseudo)
        )
        assert_rel(loss.detach(), ref.detach())
        loss.backward()
        ref.backward()
        naive_params = dict(naive.named_parameters())
        for name, p in fast.named_parameters():
            if naive_params[name].grad is None:  # the final norm, never applied (docs/method.md §a.1)
                assert p.grad is None, name
                continue
            assert_rel(p.grad, naive_params[name].grad, tol=1e-4)
    finally:
        fast.eval()
        naive.eval()


def test_seg_loss_side_without_pixels_is_zero():
    logits = torch.randn(1, 3, 4, 4)
    only_bg = torch.zeros(1, 4, 4, dtype=torch.long)
    assert torch.isfinite(seg_loss(logits, only_bg))
    assert_rel(seg_loss(logits, only_bg), naive_seg_loss(logits, only_bg))
    all_ignored = torch.full((1, 4, 4), 255)
    assert seg_loss(logits, all_ignored).item() == 0.0


def test_tiny_inputs_degenerate_without_error():
    model = build_clustercam(num_classes=2, embed_dim=48, img_size=64).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 40))  # one patch row: no super tokens (M = 0)
        assert out.segs.shape == (1, 3, 1, 2)
        assert torch.isfinite(out.cls_logits).all()
        assert model.cam(torch.randn(1, 3, 16, 40)).shape == (1, 2, 1, 2)
    with pytest.raises(ValueError, match="smaller than one 16-pixel patch"):
        model(torch.randn(1, 3, 8, 64))


def test_plain_blocks_before_clustering_blocks():
    """st_depth < depth: DeiT blocks first (norm1/attn keys), all blocks feed the heads."""
    model = build_clustercam(num_classes=3, embed_dim=48, img_size=64, st_depth=4).eval()
    keys = model.state_dict().keys()
    assert "blocks.0.attn.qkv.weight" in keys and "blocks.0.st_attn.qkv.weight" not in keys
    assert "blocks.11.st_attn.qkv_stsa.weight" in keys
    assert model.head.in_channels == 48 + 12 * 6 * 3
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 80))
    assert out.cls_logits.shape == (2, 3) and out.segs.shape == (2, 4, 4, 5)


def test_drop_path_only_in_training():
    model = build_clustercam(num_classes=2, embed_dim=48, img_size=64, drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x).cls_logits, model(x).cls_logits)
        model.train()
        torch.manual_seed(0)
        a = model(x).cls_logits
        torch.manual_seed(1)
        b = model(x).cls_logits
    assert not torch.equal(a, b)


SCALABLE = {"num_classes": 5, "embed_dim": 48, "img_size": 64, "decoder_channels": 16, "head": "scalable"}


def test_the_scalable_head_keeps_its_width_and_backbone_independent_of_the_class_count():
    small, large = build_clustercam(**SCALABLE), build_clustercam(**{**SCALABLE, "num_classes": 50})
    assert small.cls_token.shape[1] == large.cls_token.shape[1] == 1
    assert small.head.in_channels == large.head.in_channels == 48 + 12 * 6 * 1
    assert large.head.out_channels == 50 and large.cls_head.out_features == 50
    assert large.decoder.conv8.out_channels == 51


@torch.no_grad()
def test_the_scalable_head_gives_logits_cams_and_segments_of_every_class():
    model = build_clustercam(**{**SCALABLE, "head_tokens": 2}).eval()
    x = torch.randn(2, 3, 64, 80)
    out = model(x)
    assert out.cls_logits.shape == out.pat_logits.shape == (2, 5) and out.segs.shape == (2, 6, 4, 5)
    for refine in (True, False):
        cam = model.cam(x, p2p_refine=refine)
        assert cam.shape == (2, 5, 4, 5) and (cam >= 0).all() and cam.amax() > 0
    assert multi_scale_cam(model, x).shape == (2, 5, 64, 80)
    assert predict_probs(model, x, (1.0, 0.5)).shape == (2, 6, 64, 80)
    assert torch.equal(model.segment(x), out.segs)


def test_the_scalable_head_trains():
    torch.manual_seed(0)
    model = build_clustercam(**{**SCALABLE, "drop_path_rate": 0.0}).train()
    x = torch.randn(4, 3, 64, 64)
    labels = _labels(4, 5, 0)
    pseudo = torch.randint(0, 6, (4, 64, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(x)
        loss = clustercam_loss(out.cls_logits, out.pat_logits, labels, out.segs, pseudo).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_unknown_classes_get_exactly_zero_gradient_and_add_nothing_to_the_loss():
    torch.manual_seed(0)
    cls_logits = torch.randn(3, 5, requires_grad=True)
    pat_logits = torch.randn(3, 5, requires_grad=True)
    labels = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 1]], dtype=torch.float32)
    known = torch.ones(3, 5)
    known[0, 2] = known[1, 4] = known[2, 3] = 0.0  # one unknown class per image
    losses = clustercam_loss(cls_logits, pat_logits, labels, known=known)
    losses.total.backward()
    for logits in (cls_logits, pat_logits):
        assert logits.grad[known == 0].eq(0).all()
        assert logits.grad[known == 1].ne(0).all()
    # whatever the unknown classes' labels or logits, the loss is the same
    flipped = clustercam_loss(
        cls_logits.detach() + 9 * (1 - known), pat_logits.detach(), labels.masked_fill(known == 0, 1.0), known=known
    )
    assert torch.equal(flipped.total, losses.total.detach())


def test_all_known_partial_loss_equals_the_authors_loss():
    torch.manual_seed(1)
    cls_logits, pat_logits = torch.randn(4, 6), torch.randn(4, 6)
    labels = (torch.rand(4, 6) > 0.5).float()
    authors = clustercam_loss(cls_logits, pat_logits, labels).total
    assert torch.allclose(clustercam_loss(cls_logits, pat_logits, labels, known=torch.ones(4, 6)).total, authors)


def test_unverified_present_classes_turn_their_background_into_ignore():
    images01 = torch.full((1, 3, 32, 32), 0.5)
    images01[0, 0, :, :8] = 1.0  # a red object on the left, the rest flat grey
    cams = torch.zeros(1, 3, 32, 32)
    cams[0, 0, :, :8] = 1.0  # the tagged class on the left
    cams[0, 2, 20:, 20:] = 1.0  # an unknown class the classifier finds present, bottom right
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    plain = pseudo_labels(images01, cams, labels)
    partial = pseudo_labels(images01, cams, labels, unverified=torch.tensor([[False, False, True]]))
    assert (plain[0, 24:, 24:] == 0).all()  # counted as background without partial labels
    assert (partial[0, 24:, 24:] == 255).all()
    assert torch.equal(partial[0, :, :8], plain[0, :, :8])
