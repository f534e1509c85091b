"""Drop-in ``timm.layers.Attention`` whose attention runs vitkern's fused attention op.

Same constructor (arguments, order, defaults), attributes (``num_heads``, ``head_dim``,
``attn_dim``, ``scale``, ``fused_attn``), submodules and ``state_dict`` keys (``qkv``,
``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``) and
forward semantics as timm 1.0's module; the one addition is the keyword-only ``backend``.

Forward, in timm's order:

* no ``qk_norm``: ``qkv = self.qkv(x)`` goes straight into
  :func:`vitkern.ops.attention_packed`, which reads q, k, v in place from the
  (B, N, 3·h·d) Linear output and writes (B, N, h·d) for ``proj``: no permute, no copy.
* ``qk_norm``: q and k are normalised over ``head_dim`` on (B, N, h, d) views of
  ``qkv`` (the norm's output is a fresh tensor anyway), then
  :func:`vitkern.ops.attention` takes (B, h, N, d) views; its output is a view of a
  (B, N, h, d) buffer, so ``.transpose(1, 2).reshape(B, N, attn_dim)`` is free.
* then ``norm`` (``scale_norm``), the sigmoid gate ``sigmoid(gate(x))`` when ``gated``,
  ``proj`` and ``proj_drop``.

Masks (SDPA semantics, as timm's fused path):

* a floating-point ``attn_mask`` is an additive bias broadcastable to (B, h, N, N); it
  is passed to the op as ``attn_bias`` (and gets a gradient if it requires one);
* a boolean ``attn_mask`` means True = attend; it is turned explicitly into an additive
  bias (0 where True, -inf where False) in the activations' dtype;
* ``is_causal=True`` is passed to the op as ``is_causal``: the kernels mask in place and
  skip the key blocks past the diagonal (no N×N bias is built). Passing both
  ``attn_mask`` and ``is_causal=True`` raises, as SDPA does.

Attention dropout: ``attn_drop.p`` is passed to the op in training mode and 0 in eval
mode (as timm passes it to SDPA); its random numbers come from torch's default
generator, so a training step is reproducible under ``torch.manual_seed``.

Where timm asserts (or fails deep inside), this module raises :class:`ValueError`
naming the argument, the expected and the received value.
"""
from typing import Optional, Type

import torch
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern.nn import _graph

__all__ = ["Attention", "attention_bias"]


def attention_bias(attn_mask: Optional[Tensor], is_causal: bool, like: Tensor) -> Optional[Tensor]:
    """SDPA's attn_mask as an additive bias (or None); the causal mask is the op's is_causal.

    One call in an FX graph (``torch.fx.wrap``): under symbolic tracing the mask and the flag may be
    the traced model's inputs, which cannot be branched on; TorchScript compiles it as it is."""
    if is_causal and attn_mask is not None:
        raise ValueError("Attention: attn_mask must be None when is_causal=True "
                         "(as in F.scaled_dot_product_attention)")
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"Attention: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype == torch.bool:
        # True = attend (SDPA): 0 there, -inf elsewhere.
        bias = torch.zeros(attn_mask.shape, dtype=like.dtype, device=attn_mask.device)
        return bias.masked_fill_(attn_mask.logical_not(), float("-inf"))
    if not attn_mask.is_floating_point():
        raise TypeError(f"Attention: attn_mask must be a bool mask or a floating-point additive mask, "
                        f"got dtype {attn_mask.dtype}")
    return attn_mask


torch.fx.wrap("attention_bias")


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm.layers.Attention).

    Args: as ``timm.layers.Attention``, plus
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to
            :func:`vitkern.ops.attention_packed` / :func:`vitkern.ops.attention`.
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.backend = _backends.check_name(backend, "Attention")
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"Attention: num_heads must be a positive int, got {num_heads!r}")
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"Attention: dim={dim} must be divisible by num_heads={num_heads} "
                                 f"when attn_head_dim is not given")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError(f"Attention: norm_layer must be provided if qk_norm or scale_norm is True "
                             f"(got qk_norm={qk_norm}, scale_norm={scale_norm}, norm_layer=None)")

        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True  # timm's flag; vitkern's attention is always fused

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    # ------------------------------------------------------------------ helpers
    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"Attention: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"Attention: x must be 3-D (B, N, C), got shape {tuple(x.shape)}")
        dim = self.qkv.in_features
        if x.shape[-1] != dim:
            raise ValueError(f"Attention: x has {x.shape[-1]} channels (shape {tuple(x.shape)}) but the module "
                             f"was built with dim={dim}")


    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if _graph.eager(x):
            self._check_input(x)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)  # (B, N, 3·h·d), [q | k | v] with heads contiguous inside each
        bias = attention_bias(attn_mask, is_causal, qkv)
        dropout_p = self.attn_drop.p if self.training else 0.0

        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            x = _graph.attention_packed(qkv, self.num_heads, self.scale, bias, dropout_p, is_causal,
                                        self.backend)  # (B, N, h·d)
        else:
            parts = qkv.view(B, N, 3, self.num_heads, self.head_dim)
            q = self.q_norm(parts[:, :, 0])  # (B, N, h, d): the norm works on the last dim in any layout
            k = self.k_norm(parts[:, :, 1])
            v = parts[:, :, 2]
            out = _graph.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, bias,
                                   dropout_p, is_causal, self.backend)  # (B, h, N, d)
            x = out.transpose(1, 2).reshape(B, N, self.attn_dim)

        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
