"""Drop-in ``torch.nn`` modules with timm's signatures, defaults, attribute names and state_dict keys.

* :class:`PatchEmbed`           - ``timm.layers.PatchEmbed`` on the fused patchify-projection op.
* :class:`Attention`            - ``timm.layers.Attention`` on the fused attention op.
* :class:`SwinTransformerBlock` - timm ``swin_transformer.SwinTransformerBlock`` on the fused
  shifted-window attention op.
* :class:`SRAttention`          - timm ``pvt_v2.Attention`` (PVT v2 spatial-reduction attention) on
  the fused spatial-reduction attention op.
* :class:`BeitAttention`, :class:`MaxxVitAttentionCl`, :class:`MaxxVitAttention2d` - timm
  ``beit.Attention`` and ``maxxvit.AttentionCl`` / ``Attention2d`` (relative-position bias as the
  fused attention op's differentiable ``attn_bias``).
* :class:`SwinTransformerV2Block` - timm ``swin_transformer_v2.SwinTransformerV2Block`` (cosine
  attention, continuous position bias) on the fused shifted-window attention op.
"""
from vitkern.nn.attention import Attention
from vitkern.nn.attention_relpos import BeitAttention, MaxxVitAttention2d, MaxxVitAttentionCl
from vitkern.nn.patch_embed import PatchEmbed
from vitkern.nn.sr_attention import SRAttention
from vitkern.nn.window_attention import SwinTransformerBlock
from vitkern.nn.window_attention_v2 import SwinTransformerV2Block

__all__ = ["Attention", "BeitAttention", "MaxxVitAttention2d", "MaxxVitAttentionCl", "PatchEmbed", "SRAttention",
           "SwinTransformerBlock", "SwinTransformerV2Block"]
