"""Drop-in ``torch.nn`` modules with timm's signatures, defaults, attribute names and state_dict keys.

* :class:`PatchEmbed`           - ``timm.layers.PatchEmbed`` on the fused patchify-projection op.
* :class:`Attention`            - ``timm.layers.Attention`` on the fused attention op.
* :class:`SwinTransformerBlock` - timm ``swin_transformer.SwinTransformerBlock`` on the fused
  shifted-window attention op.
* :class:`SRAttention`          - timm ``pvt_v2.Attention`` (PVT v2 spatial-reduction attention) on
  the fused spatial-reduction attention op.
"""
from vitkern.nn.attention import Attention
from vitkern.nn.patch_embed import PatchEmbed
from vitkern.nn.sr_attention import SRAttention
from vitkern.nn.window_attention import SwinTransformerBlock

__all__ = ["Attention", "PatchEmbed", "SRAttention", "SwinTransformerBlock"]
