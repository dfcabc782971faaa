"""The ClusterCAM network's shape, as a typed config (every option docs/method.md names)."""

from __future__ import annotations

import dataclasses

from system.config import option


@dataclasses.dataclass(frozen=True)
class ClusterCAMConfig:
    """Defaults are the paper's DeiT-S model for PASCAL VOC (`deit_small_MCTformerV2_patch16_224`)."""

    head: str = option(
        "authors",
        "network variant, a key of system.model.spec.MODEL_SPECS: authors (the paper's: K class tokens, "
        "C + depth*heads*K head width) | scalable (cost nearly flat in K, for large vocabularies; docs/method.md §a.8)",
    )
    num_classes: int = option(20, "foreground classes K (VOC 20, COCO 80); one class token each")
    embed_dim: int = option(384, "token width C")
    depth: int = option(12, "number of transformer blocks")
    num_heads: int = option(6, "attention heads per block")
    mlp_ratio: float = option(4.0, "MLP hidden width / C")
    patch_size: int = option(16, "patch size of the patch embedding (pixels)")
    img_size: int = option(224, "size the positional embedding grid is built for (grid = img_size/patch)")
    st_depth: int | None = option(
        None,
        "number of clustering (super-token) blocks, the last ones; null = all blocks (the paper)",
    )
    grid: tuple[int, int] = option((2, 2), "super-token cell size in patches (rows, cols)")
    n_iter: int = option(3, "soft k-means iterations per clustering block")
    drop_path_rate: float = option(0.1, "stochastic depth of the last block (linear from 0)")
    qkv_bias: bool = option(True, "bias in the qkv projections")
    norm_eps: float = option(1e-6, "eps of the block LayerNorms (clustering LayerNorms keep 1e-5)")
    decoder_channels: int = option(512, "width of the LargeFOV segmentation decoder")
    decoder_dilation: int = option(5, "dilation of the LargeFOV 3x3 convolutions")
    head_tokens: int = option(
        1, "scalable head only: shared learned tokens the backbone carries in place of the K class tokens"
    )

    def __post_init__(self) -> None:
        from system.model.spec import MODEL_SPECS  # the registry builds networks from this module's configs

        if self.head not in MODEL_SPECS:
            raise ValueError(f"model.head {self.head!r} is not a known head (choices: {', '.join(MODEL_SPECS)})")
        if self.head_tokens < 1:
            raise ValueError(f"head_tokens must be >= 1, got {self.head_tokens}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.st_depth is not None and not 0 <= self.st_depth <= self.depth:
            raise ValueError(f"st_depth {self.st_depth} must lie in [0, depth={self.depth}]")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be two positive cell sizes, got {self.grid}")

    @property
    def num_st_blocks(self) -> int:
        return self.depth if self.st_depth is None else self.st_depth

    @property
    def pos_grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens the backbone carries besides the patches: one per class in the authors' network, the
        ``head_tokens`` shared ones in the scalable network."""
        return self.num_classes if self.head == "authors" else self.head_tokens

    @property
    def feature_channels(self) -> int:
        """Width of FEAT: patch features plus one token->patch attention map per block, head and token.

        The reference hard-codes 12*6*K here and therefore only runs when every block is a
        clustering block; we collect every block's class->patch attention, which equals the
        reference whenever it runs and is well defined for any st_depth.
        """
        return self.embed_dim + self.depth * self.num_heads * self.num_tokens
