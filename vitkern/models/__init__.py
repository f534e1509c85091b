"""Models built from vitkern's fused ops.

* :class:`ViT` - the seed's Vision Transformer (d2l.ai chapter 11.8) with ``pool="cls" | "mean"``;
  :func:`vit_reference_forward` is the chapter's code in plain PyTorch for the same weights.
* :class:`MaskedAutoencoderViT` - MAE pretraining (the authors' model and keys) with the mask fused
  into the patchify; constructors :func:`mae_vit_base_patch16`, :func:`mae_vit_large_patch16`,
  :func:`mae_vit_huge_patch14`.
* :mod:`vitkern.models.timm_vit` - timm's ``VisionTransformer`` / ``VisionTransformerDistilled`` with
  the whole embedding in one op, the classes :func:`vitkern.optimize` gives those models; it imports
  timm, so it is not imported here.
"""
from vitkern.models.mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
)
from vitkern.models.vit import (
    MultiHeadAttention,
    PatchEmbedding,
    ViT,
    ViTBlock,
    ViTMLP,
    vit_reference_forward,
)

__all__ = ["MaskedAutoencoderViT", "MultiHeadAttention", "PatchEmbedding", "ViT", "ViTBlock", "ViTMLP",
           "mae_vit_base_patch16", "mae_vit_huge_patch14", "mae_vit_large_patch16", "vit_reference_forward"]
