"""Masked autoencoder (MAE, He et al. 2021) pretraining on vitkern's kernels.

:class:`MaskedAutoencoderViT` has the constructor, parameter names and shapes of the authors'
``models_mae.MaskedAutoencoderViT``, so their checkpoints load strictly::

    patch_embed.proj.{weight,bias}   Conv2d(in_chans, D, patch, stride=patch)
    cls_token                        (1, 1, D)
    pos_embed                        (1, 1 + N, D) fixed 2-D sin-cos, requires_grad False
    blocks.{i}.*                     timm Block (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)
    norm                             norm_layer(D)
    decoder_embed                    Linear(D, Dd)
    mask_token                       (1, 1, Dd)
    decoder_pos_embed                (1, 1 + N, Dd) fixed 2-D sin-cos, requires_grad False
    decoder_blocks.{i}.*, decoder_norm, decoder_pred (Linear(Dd, Ph*Pw*in_chans))

``forward(imgs, mask_ratio=0.75, noise=None) -> (loss, pred, mask)``; ``noise`` (B, N), when
given, replaces the uniform noise whose argsort picks the kept patches. The reference it is tested
against is :class:`vitkern.reference.MaskedAutoencoderViTReference` (same arguments and keys).

What runs on vitkern:

* encoder stem: ONE :func:`vitkern.ops.patch_embed` call with ``keep_indices``: only the K kept
  patches are read from the image and multiplied, the CLS token is the prefix row with position
  row 0, each kept patch gets its own position row (the reference: Conv2d over all N patches,
  + pos, gather, cat);
* blocks: timm's ``Block`` built with ``attn_layer=vitkern.nn.Attention`` (the fused attention op
  on the packed qkv; same keys as timm's Attention). Norms and MLPs stay timm's;
* decoder input: ``decoder_embed``'s (B, 1+K, Dd) output and the mask token form a (B, K+2, Dd)
  source; ONE gather lays it out in patch order (row 0 CLS, a kept patch's row, or the mask-token
  row) and the position embedding is added (the reference: repeat the mask token, cat, gather,
  cat the CLS row back, + pos). Its backward is a gather too (each kept row has one destination)
  plus a mask-weighted sum for the mask token: no scatter, no atomics, deterministic. Measured on
  CPU (one thread, fp32, MAE-B's decoder: B 32, N 196, K 49, Dd 512; median of 50): forward
  ~10 ms vs ~13-15 ms for the reference's sequence, forward + backward ~15-18 ms vs ~37-38 ms.

Extensions of the authors' model: ``img_size`` and ``patch_size`` may be (h, w) pairs (the
sin-cos embedding follows the (gh, gw) grid: first half of the channels the column, second half
the row, as the authors' channel order); ``in_chans`` other than 3 in patchify/unpatchify; a
keyword-only ``backend`` for every vitkern op in the model. ``mask_ratio`` must keep at least one
patch (the authors' ``int(N * (1 - mask_ratio))``); ``mask_ratio=0`` keeps every patch and the
loss is then 0/0 = NaN, as the authors' formula gives.
"""
from functools import partial
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern import ops as _ops
from vitkern.nn.attention import Attention
from vitkern.nn.patch_embed import PatchEmbed
from vitkern.reference import (MaskedAutoencoderViTReference, mae_build, mae_check_config, mae_check_images,
                               mae_check_noise, mae_len_keep, mae_loss, mae_masking, mae_patchify, mae_timm_block,
                               mae_unpatchify)

__all__ = ["MaskedAutoencoderViT", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]


class _DecoderTokens(torch.autograd.Function):
    """out[b, t] = src[b, rows[b, t]] + pos[0, t] with src = [x | mask_token] (B, K+2, Dd)."""

    @staticmethod
    def forward(ctx, x, mask_token, pos, rows, kept_rows, mask):
        B, _, D = x.shape
        src = torch.cat([x, mask_token.to(x.dtype).expand(B, 1, D)], dim=1)
        out = src.gather(1, rows[:, :, None].expand(-1, -1, D))
        ctx.save_for_backward(kept_rows, mask)
        ctx.meta = (x.dtype, mask_token.dtype, pos.dtype, tuple(pos.shape))
        return out + pos  # promotes as the reference's add does (bf16 tokens + fp32 embedding -> fp32)

    @staticmethod
    def backward(ctx, dout):
        kept_rows, mask = ctx.saved_tensors
        x_dtype, token_dtype, pos_dtype, pos_shape = ctx.meta
        need_x, need_token, need_pos = ctx.needs_input_grad[:3]
        D = dout.shape[-1]
        dx = dtoken = dpos = None
        if need_x:  # x row j went to exactly one output row: a gather back, no scatter
            dx = dout.gather(1, kept_rows[:, :, None].expand(-1, -1, D)).to(x_dtype)
        if need_token:  # the sum over every masked position, as a reduction in a fixed order
            dtoken = torch.einsum("bn,bnd->d", mask.to(dout.dtype), dout[:, 1:]).to(token_dtype).reshape(1, 1, D)
        if need_pos:
            dpos = dout.sum(0, keepdim=True).to(pos_dtype).reshape(pos_shape)
        return dx, dtoken, dpos, None, None, None


def decoder_tokens(x: Tensor, mask_token: Tensor, pos_embed: Tensor, ids_restore: Tensor) -> Tensor:
    """MAE's decoder input in patch order: (B, 1+K, Dd) encoder tokens (CLS first, then the kept
    patches in shuffled order), the (1, 1, Dd) mask token for every removed patch, + the (1, 1+N, Dd)
    position embedding; ids_restore (B, N) is each patch's rank in the shuffled order. One gather."""
    B, T, _ = x.shape
    K = T - 1
    cls_row = ids_restore.new_zeros(B, 1)
    # patch n takes source row 1 + its rank if kept (rank < K), else row K + 1: the mask token
    rows = torch.cat([cls_row, 1 + ids_restore.clamp(max=K)], dim=1)
    # where each source row lands: the kept patch of rank j is patch ids_shuffle[j]
    ids_shuffle = torch.empty_like(ids_restore).scatter_(
        1, ids_restore, torch.arange(ids_restore.shape[1], device=ids_restore.device).expand_as(ids_restore))
    kept_rows = torch.cat([cls_row, 1 + ids_shuffle[:, :K]], dim=1)
    mask = ids_restore >= K
    return _DecoderTokens.apply(x, mask_token, pos_embed, rows, kept_rows, mask)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder over the visible patches and a light ViT decoder (the authors' model).

    Args: as the authors' ``MaskedAutoencoderViT`` (``img_size``, ``patch_size`` may be (h, w)
    pairs), plus
        backend: ``"auto" | "cuda" | "triton" | "torch"`` for the masked patchify and every
            attention (``vitkern.optimize(model, backend=...)`` switches them all later).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False, *, backend: str = "auto"):
        super().__init__()
        owner = type(self).__name__
        _backends.check_name(backend, owner)
        Block = mae_timm_block()
        img, patch, _ = mae_check_config(owner, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                                         decoder_embed_dim, decoder_depth, decoder_num_heads)
        mae_build(self, PatchEmbed(img, patch, in_chans, embed_dim, backend=backend),
                  lambda dim, heads: self._block(Block, dim, heads, mlp_ratio, norm_layer, backend),
                  in_chans, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads,
                  norm_layer, norm_pix_loss)  # the reference's modules, order and init (the authors')

    @staticmethod
    def _block(Block, dim, heads, mlp_ratio, norm_layer, backend):
        blk = Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_layer=Attention)
        blk.attn.backend = backend  # timm builds attn_layer without our keyword
        return blk

    @property
    def patch_size(self) -> Tuple[int, int]:
        return self.patch_embed.patch_size

    @property
    def img_size(self) -> Tuple[int, int]:
        return self.patch_embed.img_size

    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, Ph*Pw*C), each patch flattened as (i, j, c)."""
        return mae_patchify(imgs, self.patch_size)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, Ph*Pw*C) -> (B, C, H, W)."""
        return mae_unpatchify(x, self.patch_size, self.patch_embed.grid_size, self.in_chans)

    def masking(self, imgs: Tensor, mask_ratio: float, noise: Optional[Tensor] = None):
        """(ids_keep (B, K), mask (B, N): 0 kept / 1 removed, ids_restore (B, N)) for these images."""
        n = self.patch_embed.num_patches
        noise = mae_check_noise(type(self).__name__, noise, imgs.shape[0], n, imgs)
        return mae_masking(noise, mae_len_keep(n, mask_ratio), imgs.dtype)

    # The authors' masking of a token tensor x (B, N, D) -> (kept tokens, mask, ids_restore); the
    # encoder itself masks before the patchify (:meth:`masking`).
    random_masking = MaskedAutoencoderViTReference.random_masking

    def forward_encoder(self, imgs: Tensor, mask_ratio: float, noise: Optional[Tensor] = None):
        mae_check_images(type(self).__name__, imgs, self.in_chans, self.img_size)
        ids_keep, mask, ids_restore = self.masking(imgs, mask_ratio, noise)
        proj = self.patch_embed.proj
        # CLS + pos[0], then kept patch keep[b, j] -> row 1 + j with pos[1 + keep[b, j]]: one kernel
        x = _ops.patch_embed(imgs, proj.weight, proj.bias, cls_token=self.cls_token, pos_embed=self.pos_embed,
                             keep_indices=ids_keep, backend=self.patch_embed.backend)
        # Under autocast the op returns bf16 where the reference's conv output + fp32 pos promotes to
        # fp32: keep the residual stream in the reference's dtype.
        x = x.to(torch.promote_types(x.dtype, self.pos_embed.dtype))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        x = decoder_tokens(self.decoder_embed(x), self.mask_token, self.decoder_pos_embed, ids_restore)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        return mae_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75, noise: Optional[Tensor] = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (B, N, Ph*Pw*C)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _constructor(name, patch_size, embed_dim, depth, num_heads, doc):
    def build(**kwargs):
        return MaskedAutoencoderViT(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
                                    norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{doc}; decoder 512 wide, 8 blocks, 16 heads; LayerNorm eps 1e-6 (the authors' recipe)."
    return build


mae_vit_base_patch16 = _constructor("mae_vit_base_patch16", 16, 768, 12, 12,
                                    "MAE ViT-B/16: 768 wide, 12 blocks, 12 heads")
mae_vit_large_patch16 = _constructor("mae_vit_large_patch16", 16, 1024, 24, 16,
                                     "MAE ViT-L/16: 1024 wide, 24 blocks, 16 heads")
mae_vit_huge_patch14 = _constructor("mae_vit_huge_patch14", 14, 1280, 32, 16,
                                    "MAE ViT-H/14: 1280 wide, 32 blocks, 16 heads")
