"""Vision Transformers for 112x112 faces (arcface_torch layout) and the ViT-FIQA quality variant.

The encoder is built from timm's ``Block`` (pre-LN, SDPA attention), configured as arcface_torch
does it: patch 9 (a 12x12 grid = 144 tokens; the stride-9 conv never sees the last 4 px rows and
columns), no class token, learned position embedding, ReLU6 MLP, qkv without bias, LayerNorm eps 1e-5,
linearly increasing drop-path. The embedding head flattens *all* patch tokens, so spatial layout
reaches the embedding without pooling.

Training-time token masking keeps a random subset of patch tokens for the encoder and refills the
dropped slots with a learned mask token after the final norm, so the flatten head always sees 144
tokens. ViT-FIQA adds a learnable quality token at position 0 with its own position embedding; unlike
the official code, masking is applied to patch tokens *only*, so the quality token is never dropped.

Variant dims follow arcface_torch (see shared/reference/methods.md section 5.4): note that its
"vit_b" is embed 512 / depth 24, not the 768-wide ViT-B/16 of ImageNet.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from facerec.models.output import FaceOutput
from facerec.models.pixel_stats import PixelStats
from facerec.models.registry import register_model

_HEAD_BN_EPS = 2e-5


class TokenFlattenHead(nn.Module):
    """Flatten the patch tokens -> Linear -> BN1d -> Linear -> BN1d (no biases; the BNs carry them).

    With ``rank`` set, every token is first projected to ``rank`` channels by one shared Linear: a
    low-rank factorisation of the big (num_tokens*dim -> hidden) matrix that keeps the per-position
    weights (what makes the flatten head work for aligned faces) at a fraction of the size.
    """

    def __init__(
        self, num_tokens: int, dim: int, hidden: int, embedding_size: int, rank: int | None = None
    ) -> None:
        super().__init__()
        self.token_proj = nn.Linear(dim, rank, bias=False) if rank else nn.Identity()
        flat_dim = num_tokens * (rank or dim)
        self.fc1 = nn.Linear(flat_dim, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden, eps=_HEAD_BN_EPS)
        self.fc2 = nn.Linear(hidden, embedding_size, bias=False)
        self.bn2 = nn.BatchNorm1d(embedding_size, eps=_HEAD_BN_EPS)

    def forward(self, tokens: Tensor) -> Tensor:
        x = torch.flatten(self.token_proj(tokens), 1)
        return self.bn2(self.fc2(self.bn1(self.fc1(x))))


class FaceViT(nn.Module):
    """ViT backbone for 112x112 faces; ``quality_token=True`` makes it ViT-FIQA (T)."""

    input_size = 112

    def __init__(
        self,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        embedding_size: int = 512,
        patch_size: int = 9,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        quality_token: bool = False,
        head_hidden: int | None = None,
        head_rank: int | None = None,
        num_feature_taps: int = 4,
        pixel_stats: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.embedding_size = embedding_size
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.has_quality = quality_token
        self.num_prefix_tokens = 1 if quality_token else 0
        grid = self.input_size // patch_size
        self.num_patches = grid * grid
        self.grad_checkpointing = False

        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.quality_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if quality_token else None

        norm_layer = partial(nn.LayerNorm, eps=1e-5)
        # Deeper blocks are dropped more often (stochastic depth), as in arcface_torch.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=False,
                drop_path=rate,
                act_layer=nn.ReLU6,
                norm_layer=norm_layer,
            )
            for rate in rates
        )
        for block in self.blocks:
            # Always take F.scaled_dot_product_attention (flash / mem-efficient kernels on GPU), even if
            # TIMM_FUSED_ATTN=0 is set. arcface_torch runs its softmax in fp32 under autocast; the fused
            # kernels accumulate the softmax in fp32 internally, so nothing is lost.
            block.attn.fused_attn = True
        self.norm = norm_layer(embed_dim)

        self.head = TokenFlattenHead(
            self.num_patches, embed_dim, head_hidden or embed_dim, embedding_size, rank=head_rank
        )
        self.quality_head = (
            nn.Sequential(nn.BatchNorm1d(embed_dim, eps=_HEAD_BN_EPS), nn.Linear(embed_dim, 1, bias=False))
            if quality_token
            else None
        )

        # OOD taps: mean-pooled patch tokens after every depth/num_taps blocks; the last tap is the
        # final-norm output (what the embedding head reads).
        step = max(depth // num_feature_taps, 1)
        self.feature_blocks = sorted({min(step * k, depth) - 1 for k in range(1, num_feature_taps + 1)})
        self.feature_dims = [embed_dim] * len(self.feature_blocks)
        # Last OOD feature: high-frequency statistics of the input pixels (no weights; see
        # facerec/models/pixel_stats.py). Small L∞ attacks show there, not in pooled tokens.
        self.pixel_stats = PixelStats() if pixel_stats else None
        self.feature_kinds = ["tokens"] * len(self.feature_blocks)
        if self.pixel_stats is not None:
            self.feature_dims.append(PixelStats.dim)
            self.feature_kinds.append("pixel_stats")
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if self.quality_token is not None:
            # Near-zero start, as ViT-FIQA: the token is learned from the regression signal alone.
            nn.init.normal_(self.quality_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names an optimizer should exempt from weight decay (timm convention)."""
        names = {"pos_embed", "mask_token"}
        if self.quality_token is not None:
            names.add("quality_token")
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def keep_count(self) -> int:
        """Patch tokens kept per sample when masking is active (a Python int: no host sync)."""
        return max(int(self.num_patches * (1.0 - self.mask_ratio)), 1)

    def _random_keep_indices(self, batch: int, device: torch.device) -> Tensor:
        # Per-sample random subset of patch positions; the quality token is not among the candidates.
        noise = torch.rand(batch, self.num_patches, device=device)
        return noise.argsort(dim=1)[:, : self.keep_count()]

    def forward(self, x: Tensor, return_features: bool = False) -> FaceOutput:
        batch = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 144, D)
        tokens = tokens + self.pos_embed[:, self.num_prefix_tokens :]

        keep: Tensor | None = None
        if self.training and self.mask_ratio > 0.0:
            keep = self._random_keep_indices(batch, tokens.device)
            gather_idx = keep.unsqueeze(-1).expand(-1, -1, self.embed_dim)
            tokens = torch.gather(tokens, 1, gather_idx)

        if self.quality_token is not None:
            quality_in = (self.quality_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
            tokens = torch.cat([quality_in.to(tokens.dtype), tokens], dim=1)

        features: list[Tensor] = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if return_features and i in self.feature_blocks and i != last:
                features.append(tokens[:, self.num_prefix_tokens :].mean(dim=1))
        tokens = self.norm(tokens)
        patches = tokens[:, self.num_prefix_tokens :]
        if return_features and last in self.feature_blocks:
            features.append(patches.mean(dim=1))
        if return_features and self.pixel_stats is not None:
            features.append(self.pixel_stats(x))

        if keep is not None:
            # Refill the dropped positions with the mask token so the flatten head sees all 144 slots.
            filled = self.mask_token.to(patches.dtype).expand(batch, self.num_patches, -1)
            patches = filled.scatter(1, gather_idx, patches)

        embedding = self.head(patches)
        quality = None
        if self.quality_head is not None:
            quality = self.quality_head(tokens[:, 0]).squeeze(-1)
        return FaceOutput(embedding=embedding, quality=quality, features=features if return_features else None)


def _build(defaults: dict, overrides: dict) -> FaceViT:
    return FaceViT(**{**defaults, **overrides})


_VIT_T = {"embed_dim": 256, "depth": 12, "num_heads": 8}
_VIT_S = {"embed_dim": 512, "depth": 12, "num_heads": 8}
_VIT_B = {"embed_dim": 512, "depth": 24, "num_heads": 8}
# Ships at <= 25 MB fp32: 192 wide (3 heads of 64, a shape the fused kernels like), 8 blocks, and a
# rank-16 flatten head (144*16 -> 512) instead of the 144*D -> D matrix that dominates vit_s.
_VIT_TINY = {"embed_dim": 192, "depth": 8, "num_heads": 3, "head_rank": 16, "head_hidden": 512,
             "drop_path_rate": 0.05}


@register_model
def vit_t(**overrides) -> FaceViT:
    return _build(_VIT_T, overrides)


@register_model
def vit_s(**overrides) -> FaceViT:
    return _build(_VIT_S, overrides)


@register_model
def vit_b(**overrides) -> FaceViT:
    return _build(_VIT_B, overrides)


@register_model
def vit_t_fiqa(**overrides) -> FaceViT:
    return _build({**_VIT_T, "quality_token": True}, overrides)


@register_model
def vit_s_fiqa(**overrides) -> FaceViT:
    return _build({**_VIT_S, "quality_token": True}, overrides)


@register_model
def vit_b_fiqa(**overrides) -> FaceViT:
    return _build({**_VIT_B, "quality_token": True}, overrides)


@register_model
def vit_tiny_fiqa(**overrides) -> FaceViT:
    return _build({**_VIT_TINY, "quality_token": True}, overrides)
