"""The ClusterCAM network (docs/method.md §a), with the authors' parameter names.

Speed without changing the maths: the patch->patch attention (N x N per head) is only needed by the
CAM path, so ordinary forwards run the token update through fused scaled-dot-product attention and
compute just the K class rows of the softmax separately; the CAM path materialises the full map and
keeps only its head-mean running sum.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch import nn

from system.model.config import ClusterCAMConfig

ST_LN_EPS = 1e-5  # the clustering LayerNorms keep PyTorch's default eps (docs/method.md §e.3)
# the paper's CAM (docs/method.md §a.7): gated by the last 3 blocks' class-to-patch attention, refined along
# every block's patch-to-patch attention
CAM_LAYERS = 3
CAM_P2P_REFINE = True


class P2PRecord(enum.Enum):
    """How much of the patch->patch attention a forward keeps."""

    NONE = "none"  # fused attention, nothing materialised
    SUM = "sum"  # sum over blocks of the head-averaged map (B,N,N): what the CAM needs
    FULL = "full"  # every block and head (L,B,h,N,N): for inspection and tests


class Features(NamedTuple):
    x_cls: torch.Tensor  # (B,T,C) raw class tokens of the last block (the final norm is never applied)
    x_patch: torch.Tensor  # (B,N,C) raw patch tokens of the last block
    c2p: torch.Tensor  # (B,L,h,T,N) mixed class->patch attention of every block
    p2p: torch.Tensor | None  # (B,N,N) for SUM, (L,B,h,N,N) for FULL, None for NONE
    grid: tuple[int, int]  # patch grid (rows r, cols c)


class ClusterCAMOutput(NamedTuple):
    cls_logits: torch.Tensor  # (B,K)
    pat_logits: torch.Tensor  # (B,K)
    segs: torch.Tensor | None  # (B,K+1,r,c), None when the decoder is skipped


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, three_c = qkv.shape
    qkv = qkv.reshape(B, T, 3, num_heads, three_c // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, h, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, h * d)


def token_attention(
    u: torch.Tensor, qkv: nn.Linear, num_heads: int, num_tokens: int, record: P2PRecord
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Multi-head self-attention over class + patch tokens (``num_tokens`` class tokens first).

    Returns the merged attention output (before the output projection), the class->patch rows
    (B,h,T,N) and the patch->patch block (per head, or None when ``record`` is NONE).
    """
    q, k, v = _split_heads(qkv(u), num_heads)
    K = num_tokens
    scale = q.shape[-1] ** -0.5
    if record is P2PRecord.NONE:
        out = F.scaled_dot_product_attention(q, k, v)
        c2p = ((q[:, :, :K] @ k.transpose(-2, -1)) * scale).softmax(dim=-1)[..., K:]
        return _merge_heads(out), c2p, None
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return _merge_heads(attn @ v), attn[:, :, :K, K:], attn[:, :, K:, K:]


def soft_kmeans(
    feats: torch.Tensor, grid: tuple[int, int], cell: tuple[int, int], n_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group patch features into super tokens (docs/method.md §a.3 steps 3-4).

    ``feats`` (B,N,C) are patch features on a row-major ``grid`` (r,c). Returns the association
    (B,N,M) of the last iteration, computed *before* that iteration's update, and the updated super
    tokens (B,M,C). M = (r // cell_r) * (c // cell_c) may be 0 for tiny inputs.
    """
    B, N, C = feats.shape
    r, c = grid
    p, q = r // cell[0], c // cell[1]
    if p == 0 or q == 0:
        return feats.new_zeros(B, N, 0), feats.new_zeros(B, 0, C)
    stokens = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(B, C, r, c), (p, q))
    stokens = stokens.flatten(2).transpose(1, 2)
    scale = C**-0.5
    assoc = feats.new_zeros(B, N, p * q)
    for _ in range(n_iter):
        assoc = ((feats @ stokens.transpose(1, 2)) * scale).softmax(dim=-1)
        stokens = (assoc.transpose(1, 2) @ feats) / (assoc.sum(dim=1).unsqueeze(-1) + 1e-8)
    return assoc, stokens


class ClusterAttention(nn.Module):
    """Standard MHSA plus cluster-to-class attention over soft k-means super tokens (docs/method.md §a.3)."""

    def __init__(self, cfg: ClusterCAMConfig):
        super().__init__()
        C = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.num_tokens = cfg.num_tokens
        self.cell = tuple(cfg.grid)
        self.n_iter = cfg.n_iter
        self.mix_param = nn.Parameter(torch.rand(1))
        self.ln_pat = nn.LayerNorm(C, eps=ST_LN_EPS)
        self.qkv = nn.Linear(C, 3 * C, bias=cfg.qkv_bias)
        self.proj = nn.Linear(C, C)
        self.ln_cls = nn.LayerNorm(C, eps=ST_LN_EPS)
        self.ln_pat2 = nn.LayerNorm(C, eps=ST_LN_EPS)
        self.ln_st = nn.LayerNorm(C, eps=ST_LN_EPS)
        self.proj_st = nn.Linear(C, C)
        self.qkv_stsa = nn.Linear(C, 3 * C, bias=cfg.qkv_bias)
        self.proj_cls = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], record: P2PRecord):
        """Returns (standard-attention update, class/patch super-token update, C2P, P2P)."""
        K = self.num_tokens
        out, c2p_std, p2p = token_attention(self.ln_pat(x), self.qkv, self.num_heads, K, record)
        o_std = self.proj(out)

        x_cls, x_pat = x[:, :K], x[:, K:]
        assoc, stokens = soft_kmeans(self.ln_pat2(self.proj_st(x_pat)), grid, self.cell, self.n_iter)
        z = torch.cat([self.ln_cls(x_cls), self.ln_st(stokens)], dim=1)
        q, k, v = _split_heads(self.qkv_stsa(z), self.num_heads)
        attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
        y = _merge_heads(attn @ v)
        o_cls = self.proj_cls(y[:, :K])
        o_pat = assoc @ y[:, K:]
        c2sp = torch.einsum("bnm,bhkm->bhkn", assoc, attn[:, :, :K, K:])
        c2p = (1 - self.mix_param) * c2p_std + self.mix_param * c2sp
        return o_std, torch.cat([o_cls, o_pat], dim=1), c2p, p2p


class PlainAttention(nn.Module):
    """DeiT attention (`attn.qkv`, `attn.proj`), used for blocks before the clustering blocks."""

    def __init__(self, cfg: ClusterCAMConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_tokens = cfg.num_tokens
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, u: torch.Tensor, record: P2PRecord):
        out, c2p, p2p = token_attention(u, self.qkv, self.num_heads, self.num_tokens, record)
        return self.proj(out), c2p, p2p


def _mlp(cfg: ClusterCAMConfig) -> Mlp:
    return Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), act_layer=nn.GELU)


class ClusterBlock(nn.Module):
    def __init__(self, cfg: ClusterCAMConfig, drop_path: float):
        super().__init__()
        self.st_attn = ClusterAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = _mlp(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], record: P2PRecord):
        o_std, o_st, c2p, p2p = self.st_attn(x, grid, record)
        x = x + self.drop_path(o_std) + self.drop_path(o_st)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, c2p, p2p


class PlainBlock(nn.Module):
    def __init__(self, cfg: ClusterCAMConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = PlainAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = _mlp(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], record: P2PRecord):
        o, c2p, p2p = self.attn(self.norm1(x), record)
        x = x + self.drop_path(o)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, c2p, p2p


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV segmentation decoder (no biases, as the authors')."""

    def __init__(self, in_channels: int, out_channels: int, width: int, dilation: int):
        super().__init__()
        self.conv6 = nn.Conv2d(in_channels, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(width, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv8(F.relu(self.conv7(F.relu(self.conv6(x)))))


class ClusterCAM(nn.Module):
    def __init__(self, cfg: ClusterCAMConfig):
        super().__init__()
        self.cfg = cfg
        C, K, T = cfg.embed_dim, cfg.num_classes, cfg.num_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, T, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, T + cfg.pos_grid**2, C))
        self.patch_embed = PatchEmbed(img_size=None, patch_size=cfg.patch_size, in_chans=3, embed_dim=C)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # also under a meta device
        first_st = cfg.depth - cfg.num_st_blocks
        self.blocks = nn.ModuleList(
            (ClusterBlock if i >= first_st else PlainBlock)(cfg, rates[i]) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(C, eps=cfg.norm_eps)  # loaded from DeiT, never applied (docs/method.md §a.1)
        self.head = nn.Conv2d(cfg.feature_channels, K, 3, padding=1)
        self.decoder = LargeFOV(cfg.feature_channels, K + 1, cfg.decoder_channels, cfg.decoder_dilation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' fresh init (docs/method.md §b.2): timm ViT init for linears/norms, PyTorch's for convs."""
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        p = self.cfg.patch_size
        return x.shape[-2] // p, x.shape[-1] // p

    def interpolate_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Positional embedding for an input of ``height`` x ``width`` pixels (docs/method.md §a.1).

        The authors resample with ``scale_factor=(r+0.1)/G`` rather than ``size=r``; the sample
        positions (and so the values) differ, and checkpoints were trained with theirs.
        """
        p, K, G = self.cfg.patch_size, self.cfg.num_tokens, self.cfg.pos_grid
        r, c = height // p, width // p
        if r * c == G * G and height == width:
            return self.pos_embed
        C = self.pos_embed.shape[-1]
        patch_pos = self.pos_embed[:, K:].reshape(1, G, G, C).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((r + 0.1) / G, (c + 0.1) / G), mode="bicubic", align_corners=False
        )
        if patch_pos.shape[-2:] != (r, c):
            raise RuntimeError(f"pos-embed resample gave {tuple(patch_pos.shape[-2:])}, expected {(r, c)}")
        return torch.cat([self.pos_embed[:, :K], patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward_features(self, x: torch.Tensor, record: P2PRecord = P2PRecord.NONE) -> Features:
        B, _, H, W = x.shape
        grid = self.grid_of(x)
        if min(grid) < 1:
            raise ValueError(f"input {H}x{W} is smaller than one {self.cfg.patch_size}-pixel patch")
        K = self.cfg.num_tokens
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.interpolate_pos_embed(H, W)
        c2ps, p2ps = [], []
        p2p_sum = None
        for blk in self.blocks:
            tokens, c2p, p2p = blk(tokens, grid, record)
            c2ps.append(c2p)
            if record is P2PRecord.FULL:
                p2ps.append(p2p)
            elif record is P2PRecord.SUM:
                mean = p2p.mean(dim=1)
                p2p_sum = mean if p2p_sum is None else p2p_sum + mean
        p2p_out = torch.stack(p2ps) if record is P2PRecord.FULL else p2p_sum
        return Features(tokens[:, :K], tokens[:, K:], torch.stack(c2ps, dim=1), p2p_out, grid)

    def feature_map(self, feats: Features) -> torch.Tensor:
        """FEAT (B, C + L*h*T, r, c): patch features, then class->patch maps, channel (block*h+head)*T+t."""
        B, N, C = feats.x_patch.shape
        r, c = feats.grid
        patch = feats.x_patch.transpose(1, 2).reshape(B, C, r, c)
        attn = feats.c2p.reshape(B, -1, r, c)
        return torch.cat([patch, attn], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        with_seg: bool = True,
        task: Literal["logits", "cam", "segment"] = "logits",
        n_layers: int = CAM_LAYERS,
        p2p_refine: bool = CAM_P2P_REFINE,
    ):
        """Every use goes through ``forward`` so that hooks on the root module (ZeRO-3's parameter
        gathering, DDP, profilers) see it; ``cam`` and ``segment`` are shorthands."""
        if task == "cam":
            return self._cam(x, n_layers, p2p_refine)
        if task == "segment":
            return self.decoder(self.feature_map(self.forward_features(x)))
        feats = self.forward_features(x)
        fmap = self.feature_map(feats)
        cls_logits = self.class_logits(feats)
        pat_logits = self.head(fmap).mean(dim=(2, 3))
        segs = self.decoder(fmap) if with_seg else None
        return ClusterCAMOutput(cls_logits, pat_logits, segs)

    def class_logits(self, feats: Features) -> torch.Tensor:
        """``cls_logits`` (B,K): the mean over channels of each final class token (docs/method.md §a.5)."""
        return feats.x_cls.mean(dim=-1)

    def cam_gate(self, feats: Features, n_layers: int) -> torch.Tensor:
        """The CAM's gate (B,K,N): class->patch attention, head mean, last ``n_layers`` summed (§a.7 step 2)."""
        return feats.c2p[:, -n_layers:].mean(dim=2).sum(dim=1)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Only the decoder logits (B,K+1,r,c): what test-time inference needs."""
        return self(x, task="segment")

    def cam(self, x: torch.Tensor, n_layers: int = CAM_LAYERS, p2p_refine: bool = CAM_P2P_REFINE) -> torch.Tensor:
        """The ClusterCAM of docs/method.md §a.7, (B,K,r,c), unnormalised and detached from the head."""
        return self(x, task="cam", n_layers=n_layers, p2p_refine=p2p_refine)

    def _cam(self, x: torch.Tensor, n_layers: int, p2p_refine: bool) -> torch.Tensor:
        record = P2PRecord.SUM if p2p_refine else P2PRecord.NONE
        feats = self.forward_features(x, record)
        fmap = self.feature_map(feats)
        cam = F.relu(F.conv2d(fmap, self.head.weight.detach(), None, padding=1))
        B, K, r, c = cam.shape
        cam = self.cam_gate(feats, n_layers) * cam.flatten(2)
        if p2p_refine:
            cam = cam @ feats.p2p.transpose(1, 2)
        return cam.reshape(B, K, r, c)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_clustercam(cfg: ClusterCAMConfig | None = None, **overrides) -> ClusterCAM:
    """A freshly initialised model of ``head`` (the authors' by default); ``overrides`` are ClusterCAMConfig fields."""
    from system.model.spec import build_model  # the registry imports this module

    return build_model(dataclasses.replace(cfg or ClusterCAMConfig(), **overrides))
