"""A straightforward implementation of docs/method.md, written the way the authors' code runs.

It is the baseline that benchmarks/model.py measures against and an independent second
implementation that the tests compare the fast library with on shapes the golden set lacks. Every
attention map is materialised, stacked and sliced, PAR stacks all 48 neighbours through a dilated
convolution, pseudo labels are refined one image at a time, the segmentation loss is two
cross-entropy calls. It shares nothing with system/ but the parameter names.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class NaiveDropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class NaiveMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NaiveSTAttention(nn.Module):
    def __init__(self, dim, num_heads, num_classes, grid=(2, 2), n_iter=3):
        super().__init__()
        self.num_heads, self.K, self.grid, self.n_iter = num_heads, num_classes, grid, n_iter
        self.scale = (dim // num_heads) ** -0.5
        self.mix_param = nn.Parameter(torch.rand(1))
        self.ln_pat = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.ln_cls = nn.LayerNorm(dim)
        self.ln_pat2 = nn.LayerNorm(dim)
        self.ln_st = nn.LayerNorm(dim)
        self.proj_st = nn.Linear(dim, dim)
        self.qkv_stsa = nn.Linear(dim, dim * 3)
        self.proj_cls = nn.Linear(dim, dim)

    def _attn(self, x, qkv_layer):
        B, T, C = x.shape
        qkv = qkv_layer(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, T, C)
        return out, attn

    def forward(self, x, r, c):
        B, T, C = x.shape
        K = self.K
        out, attn = self._attn(self.ln_pat(x), self.qkv)
        x_std = self.proj(out)
        p2p = attn[:, :, K:, K:]
        c2p_std = attn[:, :, :K, K:]

        pat = self.ln_pat2(self.proj_st(x[:, K:]))
        pgrid = pat.transpose(1, 2).reshape(B, C, r, c)
        hh, ww = r // self.grid[0], c // self.grid[1]
        if hh * ww == 0:
            assoc = pat.new_zeros(B, r * c, 0)
            stok = pat.new_zeros(B, 0, C)
        else:
            stok = F.adaptive_avg_pool2d(pgrid, (hh, ww)).reshape(B, C, -1).transpose(1, 2)
            for _ in range(self.n_iter):
                assoc = (pat @ stok.transpose(1, 2) * C**-0.5).softmax(-1)
                norm = assoc.sum(1).unsqueeze(-1) + 1e-8
                stok = assoc.transpose(1, 2) @ pat / norm
        z = torch.cat([self.ln_cls(x[:, :K]), self.ln_st(stok)], dim=1)
        y, attn2 = self._attn(z, self.qkv_stsa)
        x_cls = self.proj_cls(y[:, :K])
        x_pat = assoc @ y[:, K:]
        c2s = attn2[:, :, :K, K:]
        c2sp = torch.zeros_like(c2p_std)
        for hd in range(self.num_heads):
            c2sp[:, hd] = c2s[:, hd] @ assoc.transpose(1, 2)
        c2p = (1 - self.mix_param) * c2p_std + self.mix_param * c2sp
        return x_std, torch.cat([x_cls, x_pat], dim=1), p2p, c2p


class NaiveBlock(nn.Module):
    def __init__(self, dim, num_heads, num_classes, drop_path):
        super().__init__()
        self.st_attn = NaiveSTAttention(dim, num_heads, num_classes)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = NaiveMlp(dim, dim * 4)
        self.drop_path = NaiveDropPath(drop_path)

    def forward(self, x, r, c):
        a, b, p2p, c2p = self.st_attn(x, r, c)
        x = x + self.drop_path(a) + self.drop_path(b)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, p2p, c2p


class NaivePatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class NaiveLargeFOV(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv6 = nn.Conv2d(cin, 512, 3, padding=5, dilation=5, bias=False)
        self.conv7 = nn.Conv2d(512, 512, 3, padding=5, dilation=5, bias=False)
        self.conv8 = nn.Conv2d(512, cout, 1, bias=False)

    def forward(self, x):
        return self.conv8(F.relu(self.conv7(F.relu(self.conv6(x)))))


class NaiveClusterCAM(nn.Module):
    """All blocks are clustering blocks and depth * heads = 72, as in the authors' code."""

    def __init__(
        self, num_classes=20, embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=224, drop_path_rate=0.1
    ):
        super().__init__()
        self.K, self.patch, self.G = num_classes, patch_size, img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_classes + self.G**2, embed_dim))
        self.patch_embed = NaivePatchEmbed(embed_dim, patch_size)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(NaiveBlock(embed_dim, num_heads, num_classes, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        width = embed_dim + depth * num_heads * num_classes
        self.head = nn.Conv2d(width, num_classes, 3, padding=1)
        self.decoder = NaiveLargeFOV(width, num_classes + 1)

    def interpolate_pos_encoding(self, H, W):
        r, c = H // self.patch, W // self.patch
        if r * c == self.G**2 and H == W:
            return self.pos_embed
        C = self.pos_embed.shape[-1]
        pp = self.pos_embed[:, self.K :].reshape(1, self.G, self.G, C).permute(0, 3, 1, 2)
        pp = F.interpolate(
            pp, scale_factor=((r + 0.1) / self.G, (c + 0.1) / self.G), mode="bicubic", align_corners=False
        )
        return torch.cat([self.pos_embed[:, : self.K], pp.permute(0, 2, 3, 1).reshape(1, -1, C)], dim=1)

    def forward_features(self, x):
        B, _, H, W = x.shape
        r, c = H // self.patch, W // self.patch
        t = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        t = t + self.interpolate_pos_encoding(H, W)
        p2ps, c2ps = [], []
        for blk in self.blocks:
            t, p2p, c2p = blk(t, r, c)
            p2ps.append(p2p)
            c2ps.append(c2p)
        return t[:, : self.K], t[:, self.K :], torch.stack(p2ps), torch.stack(c2ps), r, c

    def forward(self, x, cam_only=False, n_layers=3, p2p_refine=True, skip_seg=False):
        x_cls, x_patch, p2p, c2p, r, c = self.forward_features(x)
        B, N, C = x_patch.shape
        feat = x_patch.transpose(1, 2).reshape(B, C, r, c)
        attn_feat = c2p.permute(1, 0, 2, 3, 4).reshape(B, -1, r, c)
        feat = torch.cat([feat, attn_feat], dim=1)
        if cam_only:
            cam = F.conv2d(feat, self.head.weight, padding=1).detach()
            cam = F.relu(cam)
            gate = c2p.mean(2)[-n_layers:].sum(0).reshape(B, self.K, r, c)
            cam = gate * cam
            if p2p_refine:
                R = p2p.mean(2).sum(0)
                cam = torch.matmul(R.unsqueeze(1), cam.reshape(B, self.K, -1, 1)).reshape(B, self.K, r, c)
            return cam
        logits = self.head(feat)
        pat_logits = F.adaptive_avg_pool2d(logits, 1).flatten(1)
        cls_logits = x_cls.mean(-1)
        segs = None if skip_seg else self.decoder(feat)
        return cls_logits, pat_logits, segs


def naive_multi_scale_cam(model, inputs, scales):
    b, _, h, w = inputs.shape
    cam_list = []
    for s in [1.0] + [s for s in scales if s != 1.0]:
        x = (
            inputs
            if s == 1.0
            else F.interpolate(inputs, size=(int(s * h), int(s * w)), mode="bilinear", align_corners=False)
        )
        with torch.no_grad():
            cam = model(torch.cat([x, x.flip(-1)], dim=0), cam_only=True).float()
        cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
        cam_list.append(F.relu(torch.max(cam[:b], cam[b:].flip(-1))))
    cam = torch.sum(torch.stack(cam_list, dim=0), dim=0)
    cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
    cam /= F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5
    return cam


class NaivePAR(nn.Module):
    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter=10):
        super().__init__()
        self.dilations, self.num_iter = dilations, num_iter
        kernel = torch.zeros(8, 1, 3, 3)
        for i, (a, bb) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
            kernel[i, 0, a, bb] = 1
        self.register_buffer("kernel", kernel)
        ker = torch.ones(1, 1, 8, 1, 1)
        for i in (0, 2, 5, 7):
            ker[0, 0, i] = np.sqrt(2)
        self.pos = torch.cat([ker * d for d in dilations], dim=2)

    def neighbours(self, x):
        b, c, h, w = x.shape
        out = []
        for d in self.dilations:
            xp = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(xp, self.kernel, dilation=d).view(b, c, -1, h, w))
        return torch.cat(out, dim=2)

    def forward(self, imgs, masks):
        masks = F.interpolate(masks, size=imgs.shape[-2:], mode="bilinear", align_corners=True)
        b, c, h, w = imgs.shape
        n = self.neighbours(imgs)
        pos = self.pos.to(imgs.device).repeat(b, 1, 1, h, w)
        diff = torch.abs(n - imgs.unsqueeze(2).repeat(1, 1, n.shape[2], 1, 1))
        aff = -((diff / (torch.std(n, dim=2, keepdim=True) + 1e-5) / 0.3) ** 2)
        aff = aff.mean(dim=1, keepdim=True)
        pos_aff = -((pos / (torch.std(pos, dim=2, keepdim=True) + 1e-5) / 0.3) ** 2)
        aff = F.softmax(aff, dim=2) + 0.01 * F.softmax(pos_aff, dim=2)
        for _ in range(self.num_iter):
            masks = (self.neighbours(masks) * aff).sum(2)
        return masks


def naive_refine_cams_with_bkg(par, images, cams, cls_labels, high, low, ignore_index=255):
    b, _, h, w = images.shape
    small = [h // 2, w // 2]
    _images = F.interpolate(images, size=small, mode="bilinear", align_corners=False)
    labels = torch.cat([torch.ones(b, 1, device=cls_labels.device), cls_labels.float()], dim=1)
    out = []
    for thr in (high, low):
        planes = torch.cat([torch.ones(b, 1, h, w, device=cams.device) * thr, cams], dim=1)
        planes = F.interpolate(planes, size=small, mode="bilinear", align_corners=False)
        lab = torch.ones(b, h, w, dtype=torch.long, device=cams.device) * ignore_index
        for i in range(b):
            key = torch.nonzero(labels[i])[:, 0]
            sel = planes[i, key].unsqueeze(0).softmax(dim=1)
            ref = par(_images[[i]], sel)
            ref = F.interpolate(ref, size=(h, w), mode="bilinear", align_corners=False)
            lab[i] = key[ref.argmax(dim=1)][0]
        out.append(lab)
    hi, lo = out
    res = hi.clone()
    res[hi == 0] = ignore_index
    res[(hi + lo) == 0] = 0
    return res


def naive_denormalize(x):
    mean = torch.tensor([123.675, 116.28, 103.53], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 255).to(torch.uint8).float() / 255


def naive_seg_loss(pred, label, ignore_index=255):
    bg = label.clone()
    bg[label != 0] = ignore_index
    bg_loss = F.cross_entropy(pred, bg.long(), ignore_index=ignore_index)
    fg = label.clone()
    fg[label == 0] = ignore_index
    fg_loss = F.cross_entropy(pred, fg.long(), ignore_index=ignore_index)
    bg_loss = torch.nan_to_num(bg_loss, nan=0.0)
    fg_loss = torch.nan_to_num(fg_loss, nan=0.0)
    return 0.5 * (bg_loss + fg_loss)


def naive_train_loss(model, x, labels, pseudo=None):
    cls_logits, pat_logits, segs = model(x, skip_seg=pseudo is None)
    loss = F.multilabel_soft_margin_loss(cls_logits, labels) + F.multilabel_soft_margin_loss(pat_logits, labels)
    if pseudo is not None:
        segs = F.interpolate(segs, size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss + 0.1 * naive_seg_loss(segs, pseudo)
    return loss


def naive_predict_probs(model, x, scales=(0.5, 0.75, 1.0, 1.25, 1.5)):
    b, _, h, w = x.shape
    probs = torch.zeros(b, model.K + 1, h, w, device=x.device)
    with torch.no_grad():
        for s in scales:
            xs = F.interpolate(x, size=(int(h * s), int(w * s)), mode="bilinear", align_corners=True)
            _, _, segs = model(xs)
            segs = F.interpolate(segs.float(), size=(h, w), mode="bilinear", align_corners=False)
            probs = torch.max(probs, F.softmax(segs, dim=1))
    return probs


__all__ = [
    "NaiveClusterCAM",
    "NaivePAR",
    "naive_denormalize",
    "naive_multi_scale_cam",
    "naive_predict_probs",
    "naive_refine_cams_with_bkg",
    "naive_seg_loss",
    "naive_train_loss",
]
