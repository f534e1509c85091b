"""Drop-in timm ``pvt_v2.Attention`` (PVT v2 spatial-reduction attention) on vitkern's fused op.

Same constructor (arguments, order, defaults, as timm 1.0.31), attributes (``dim``,
``num_heads``, ``head_dim``, ``scale``, ``fused_attn``), submodules (``q``, ``kv``,
``attn_drop``, ``proj``, ``proj_drop``, ``pool``, ``sr``, ``norm``, ``act``: ``None`` exactly
where timm has ``None``) and ``state_dict`` keys (``q.*``, ``kv.*``, ``proj.*`` and, when keys
are reduced, ``sr.*`` and ``norm.*``), so weights load strictly in both directions. The one
addition is the keyword-only ``backend``; ``sr_ratio`` and ``linear_attn`` are also kept as
attributes (timm keeps them only implicitly, in which submodules exist).

Forward ``forward(x, feat_size)`` on x (B, N, C) with N = H·W, as timm::

    y = vitkern.ops.sr_attention(x, feat_size, num_heads=..., q_weight=q.weight, ..., sr_ratio=...,
                                 linear_attn=..., norm_eps=norm.eps, scale=scale,
                                 dropout_p=attn_drop.p if training else 0., backend=backend)
    y = proj_drop(y)

The op runs the key reduction (``sr_ratio > 1``: the strided ``sr`` conv + LayerNorm;
``linear_attn``: 7x7 adaptive average pool + 1x1 ``sr`` conv + LayerNorm + GELU), the
``q``/``kv`` projections, the attention of the N queries over the reduced keys and ``proj``.
The module's ``pool`` and ``act`` hold no parameters and are not called (the op applies the
same AdaptiveAvgPool2d(7) and exact GELU); they exist so that the module looks like timm's.

Attention dropout: ``attn_drop.p`` is passed to the op in training mode, 0 in eval mode (as
timm passes it to SDPA). With ``backend="torch"`` the probabilities are dropped with
``F.dropout``, exactly as timm's unfused path (``fused_attn=False``) does, so the same seed
gives the same result; the Triton kernels draw their Philox seed from torch's default
generator, so a training step is reproducible under ``torch.manual_seed``.

Where timm asserts (or fails deep inside), this module raises a ``ValueError`` / ``TypeError``
naming the argument, the expected and the received value.
"""

import operator
from typing import List, Tuple

import torch
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern.nn import _graph

__all__ = ["SRAttention"]

_OWNER = "SRAttention"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_size(v):
    """``v`` as an int (Python int, torch.SymInt under torch.compile, numpy / 0-d integer), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, torch.SymInt)):
        return v
    try:
        return operator.index(v)
    except TypeError:
        return None


class SRAttention(nn.Module):
    """PVT v2 spatial-reduction attention (timm ``pvt_v2.Attention``).

    Args: as timm ``pvt_v2.Attention`` (``dim``, ``num_heads=8``, ``sr_ratio=1``,
        ``linear_attn=False``, ``qkv_bias=True``, ``attn_drop=0.``, ``proj_drop=0.``,
        ``device``, ``dtype``), plus
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to :func:`vitkern.ops.sr_attention`.
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        sr_ratio: int = 1,
        linear_attn: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.backend = _backends.check_name(backend, _OWNER)
        if not _is_int(dim) or dim <= 0:
            raise ValueError(f"{_OWNER}: dim must be a positive int, got {dim!r}")
        if not _is_int(num_heads) or num_heads <= 0:
            raise ValueError(f"{_OWNER}: num_heads must be a positive int, got {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"{_OWNER}: dim={dim} must be divisible by num_heads={num_heads}")
        if not _is_int(sr_ratio) or sr_ratio < 1:
            raise ValueError(f"{_OWNER}: sr_ratio must be an int >= 1, got {sr_ratio!r}")

        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True  # timm's flag; vitkern's attention is always fused
        self.sr_ratio = sr_ratio
        self.linear_attn = bool(linear_attn)

        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        # Same submodules, in the same order, as timm (the state_dict key order follows it).
        if not linear_attn:
            self.pool = None
            if sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
                self.norm = nn.LayerNorm(dim, **dd)
            else:
                self.sr = None
                self.norm = None
            self.act = None
        else:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
            self.act = nn.GELU()

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, sr_ratio={self.sr_ratio}, "
                f"linear_attn={self.linear_attn}, backend={self.backend!r}")

    # ------------------------------------------------------------------ helpers
    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor, feat_size: List[int]) -> Tuple[int, int]:
        if not isinstance(x, Tensor):
            raise TypeError(f"{_OWNER}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{_OWNER}: x must be 3-D (B, N, C), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{_OWNER}: x has {x.shape[-1]} channels (shape {tuple(x.shape)}) but the module "
                             f"was built with dim={self.dim}")
        try:
            H, W = feat_size
        except (TypeError, ValueError):
            raise ValueError(f"{_OWNER}: feat_size must be an (H, W) pair, got {feat_size!r}") from None
        H, W = _as_size(H), _as_size(W)
        if H is None or W is None or H <= 0 or W <= 0:
            raise ValueError(f"{_OWNER}: feat_size must be an (H, W) pair of positive ints, got {feat_size!r}")
        N = x.shape[1]
        if H * W != N:
            raise ValueError(f"{_OWNER}: feat_size {(H, W)} gives H*W = {H * W} tokens but x has N = {N} "
                             f"(shape {tuple(x.shape)})")
        if self.sr is not None and not self.linear_attn and (H < self.sr_ratio or W < self.sr_ratio):
            raise ValueError(f"{_OWNER}: feat_size must be at least sr_ratio = {self.sr_ratio} in each dimension, "
                             f"got {(H, W)}")
        return H, W

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, feat_size: List[int]) -> Tensor:
        if _graph.eager(x):
            H, W = self._check_input(x, feat_size)
        else:
            H, W = feat_size[0], feat_size[1]
        sr_weight, sr_bias, norm_weight, norm_bias = None, None, None, None
        sr_ratio, norm_eps = 1, 1e-5
        if self.sr is not None and self.norm is not None:
            sr_weight, sr_bias, sr_ratio = self.sr.weight, self.sr.bias, self.sr_ratio
            norm_weight, norm_bias, norm_eps = self.norm.weight, self.norm.bias, self.norm.eps
        x = _graph.sr_attention(
            x, [H, W], self.num_heads, self.q.weight, self.q.bias, self.kv.weight, self.kv.bias,
            self.proj.weight, self.proj.bias, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio,
            self.linear_attn, norm_eps, self.scale, self.attn_drop.p if self.training else 0.0, self.backend,
        )
        return self.proj_drop(x)
