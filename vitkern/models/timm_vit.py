"""timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` with the whole embedding in one op.

:func:`vitkern.optimize` gives a timm ViT (or DeiT with a distillation token) one of these
classes in place (``model.__class__`` is swapped; the object, its modules, parameters,
attributes and hooks stay the same), after converting its ``patch_embed`` to
:class:`vitkern.nn.PatchEmbed`. timm builds the tokens with a patch convolution, then
``torch.cat`` of the CLS / register / distillation tokens and a separate ``+ pos_embed`` (in
``_pos_embed``); here one :func:`vitkern.ops.patch_embed` call writes the (B, T+N, D) tokens,
prefix rows and position embedding included (``no_embed_class``: the position embedding
covers the patch rows only). What is done before the op, as timm does it: dynamic image
padding or cropping (``dynamic_img_pad``, an ``img_size`` not divisible by the patch) and, with
``dynamic_img_size``, timm's own ``resample_abs_pos_embed``. ``pos_drop`` runs on the op's
output, as timm runs it on the sum.

Everything else is timm's: ``model.patch_embed(img)`` alone still returns the patch tokens,
``_pos_embed`` is timm's method, ``forward_intermediates`` is timm's code run with the fused
embedding, ``forward_head``, pooling, ``no_weight_decay()``, ``set_distilled_training`` and so on
are inherited. Under ``torch.jit.script`` the model runs timm's unfused embedding (the patch
module, then ``_pos_embed``), so a scripted model computes what timm's does.

This module imports timm (the classes subclass timm's); :mod:`vitkern.models` does not import it.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from timm.layers import register_notrace_function, resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.deit import VisionTransformerDistilled as _TimmDistilled
from timm.models.vision_transformer import VisionTransformer as _TimmViT

from vitkern import ops as _ops

__all__ = ["VisionTransformer", "VisionTransformerDistilled", "vit_embedding", "CONVERTED"]


@register_notrace_function  # timm's FX feature extraction keeps the call whole
def vit_embedding(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    prefix: List[Tensor],
    pos_embed: Optional[Tensor],
    patch_size: Tuple[int, int],
    img_size: Optional[Tuple[int, int]],
    strict_img_size: bool,
    dynamic_img_pad: bool,
    resample_from: Optional[Tuple[int, int]],
    resample_prefix: int,
    pos_embed_covers_prefix: bool,
    backend: str,
) -> Tensor:
    """Image (B, C, H, W) -> (B, T+N, D) ViT tokens in one :func:`vitkern.ops.patch_embed` call.

    ``prefix``: the (1, k, D) token parameters written before the patch rows, in timm's order;
    ``resample_from``: the grid ``pos_embed`` was made for, when it is to be resampled to this
    image's grid (timm's ``dynamic_img_size``), else None; ``resample_prefix``: how many of its
    leading rows are prefix rows (0 with ``no_embed_class``). The other arguments are the
    patch module's, as :class:`vitkern.nn.PatchEmbed` reads them.
    """
    H, W = x.shape[-2], x.shape[-1]
    ph, pw = patch_size
    if img_size is not None and strict_img_size and (H, W) != tuple(img_size):
        raise ValueError(
            f"VisionTransformer: input image size (H, W)=({H}, {W}) does not match patch_embed.img_size="
            f"{tuple(img_size)} (strict_img_size=True); resize the input, or build the model with "
            f"dynamic_img_size=True")
    if dynamic_img_pad:
        x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
    elif (H % ph or W % pw) and (img_size is None or strict_img_size):
        # timm's Conv2d ignores the trailing rows/columns (a strided view, no copy); with strict_img_size=False
        # such a size is refused by the op, as by timm's PatchEmbed
        x = x[..., : H - H % ph, : W - W % pw]
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    if pos_embed is not None and resample_from is not None:
        pos_embed = resample_abs_pos_embed(pos_embed, new_size=[gh, gw], old_size=list(resample_from),
                                           num_prefix_tokens=resample_prefix)
    # The op takes one (1, T, D) prefix; CLS with register or distillation tokens are separate parameters in timm,
    # so those T rows (not the batch's tokens) are joined here.
    tokens = prefix[0] if len(prefix) == 1 else torch.cat(prefix, dim=1) if prefix else None
    return _ops.patch_embed(x, weight, bias, prefix_tokens=tokens, pos_embed=pos_embed,
                            pos_embed_covers_prefix=pos_embed_covers_prefix, backend=backend)


torch.fx.wrap("vit_embedding")  # torch.fx.symbolic_trace keeps it as one call too


class _PassImage:
    """Stands for ``patch_embed`` inside timm's forward methods run with the fused embedding: the image
    passes through (the tokens are made in ``_pos_embed``'s place); other attributes are the module's."""

    def __init__(self, patch_embed):
        self._patch_embed = patch_embed

    def __call__(self, x):
        return x

    def __getattr__(self, name):
        return getattr(self._patch_embed, name)


class _FusedView:
    """``model`` as timm's forward methods see it, except that ``patch_embed`` passes the image on and
    ``_pos_embed`` makes every token from it in one op."""

    def __init__(self, model):
        self._model = model
        self.patch_embed = _PassImage(model.patch_embed)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _pos_embed(self, x):
        return self._model._fused_tokens(x)


class _FusedEmbedding:
    """The methods both converted classes share (a mixin placed before the timm class)."""

    backend: str

    def _prefix_tokens(self) -> List[Tensor]:
        """The token parameters timm writes before the patch rows, in its order."""
        out: List[Tensor] = []
        if self.cls_token is not None:
            out.append(self.cls_token)
        if self.reg_token is not None:
            out.append(self.reg_token)
        return out

    def _fused_tokens(self, x: Tensor) -> Tensor:
        """Image -> what timm's ``_pos_embed(patch_embed(x))`` returns, the tokens made in one op."""
        pe = self.patch_embed
        pos = self.pos_embed
        tokens = vit_embedding(
            x, pe.proj.weight, pe.proj.bias, self._prefix_tokens(), pos,
            tuple(pe.patch_size), None if pe.img_size is None else tuple(pe.img_size),
            bool(pe.strict_img_size), bool(pe.dynamic_img_pad),
            tuple(pe.grid_size) if self.dynamic_img_size and pos is not None else None,
            0 if self.no_embed_class else self.num_prefix_tokens,
            not self.no_embed_class, self.backend)
        # timm applies pos_drop only when there is a position embedding
        return tokens if pos is None else self.pos_drop(tokens)

    def _tokens(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._pos_embed(self.patch_embed(x))  # timm's own path: a scripted model computes timm's
        return self._fused_tokens(x)

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """timm's ``forward_features`` with the tokens made in one op."""
        x = self.norm_pre(self.patch_drop(self._tokens(x)))
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, *args, **kwargs):
        """timm's ``forward_intermediates`` (same arguments and results), its tokens made in one op."""
        return _TimmViT.forward_intermediates(_FusedView(self), x, *args, **kwargs)


class VisionTransformer(_FusedEmbedding, _TimmViT):
    """timm's ``VisionTransformer`` whose embedding (patches, CLS and register tokens, position
    embedding) is one :func:`vitkern.ops.patch_embed` call; made by :func:`vitkern.optimize`."""


class VisionTransformerDistilled(_FusedEmbedding, _TimmDistilled):
    """timm's DeiT ``VisionTransformerDistilled`` (CLS and distillation token) with the fused embedding."""

    def _prefix_tokens(self) -> List[Tensor]:
        return [self.cls_token, self.dist_token]  # timm's order; its _pos_embed writes no register tokens


# timm class -> converted class (exact classes: a subclass may change the embedding)
CONVERTED = {_TimmViT: VisionTransformer, _TimmDistilled: VisionTransformerDistilled}
