"""Models built from vitkern's fused ops.

* :class:`ViT` - the seed's Vision Transformer (d2l.ai chapter 11.8) with ``pool="cls" | "mean"``;
  :func:`vit_reference_forward` is the chapter's code in plain PyTorch for the same weights.
* :mod:`vitkern.models.timm_vit` - timm's ``VisionTransformer`` / ``VisionTransformerDistilled`` with
  the whole embedding in one op, the classes :func:`vitkern.optimize` gives those models; it imports
  timm, so it is not imported here.
"""
from vitkern.models.vit import (
    MultiHeadAttention,
    PatchEmbedding,
    ViT,
    ViTBlock,
    ViTMLP,
    vit_reference_forward,
)

__all__ = ["MultiHeadAttention", "PatchEmbedding", "ViT", "ViTBlock", "ViTMLP", "vit_reference_forward"]
