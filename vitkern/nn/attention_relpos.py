"""Drop-ins for timm's relative-position attention modules, on vitkern's fused attention op.

* :class:`BeitAttention`      - ``timm.models.beit.Attention`` (BEiT v1/v2: relative-position
  bias table with BEiT's three class-token entries, separate q/v biases with a zero k bias).
* :class:`MaxxVitAttentionCl` - ``timm.models.maxxvit.AttentionCl`` (channels-last: MaxViT's
  block/grid partition attention, CoAtNet ``*_cl`` variants).
* :class:`MaxxVitAttention2d` - ``timm.models.maxxvit.Attention2d`` (NCHW: CoAtNet's
  ``TransformerBlock2d`` and MaxViT's ``use_nchw_attn`` partition attention).

Each has timm's constructor (arguments, order, defaults), attributes, submodules, parameters,
buffers (persistent and not) and ``state_dict`` keys, plus a keyword-only ``backend``.

The relative-position bias goes to :func:`vitkern.ops.attention` / ``attention_packed`` as
``attn_bias``: it is gathered from the table once per forward into a (1, h, N, N) tensor (the
size of the table's expansion, independent of the batch), and the op adds it to the scores tile
by tile inside the kernel and, in the backward, reduces its gradient over the batch in-kernel
(so autograd carries it back to the table through the gather). The (B, h, N, N) scores and
probabilities themselves are never materialised.

Forward semantics are timm's fused (SDPA) path:

* BEiT: the module's own bias (if ``window_size``) plus the model's ``shared_rel_pos_bias``
  (either may be absent); q/v biases concatenated with the zero ``k_bias`` buffer as timm does
  (``F.linear`` with that bias, or added after the Linear when ``qkv_bias_separate``); the qkv
  output is (B, N, 3, h, d), the layout ``attention_packed`` reads in place.
* MaxxViT: the ``rel_pos`` module's ``get_bias()`` when there is one (``shared_rel_pos`` is then
  ignored, as in timm), else ``shared_rel_pos``. ``rel_pos`` is whatever ``rel_pos_cls`` builds
  (timm's ``RelPosBias``, ``RelPosBiasTf`` or ``RelPosMlp``: any module with ``get_bias()``), so
  the table, its index buffers and ``set_window_size`` stay timm's. q, k, v are strided views of
  the qkv projection's output in timm's channel order (``head_first``: per head [q | k | v]; else
  [q | k | v] with heads inside), read in place by the kernel.

Attention dropout: ``attn_drop.p`` in training mode, 0 in eval (as timm passes it to SDPA),
drawn in-kernel from torch's default generator.
"""

from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern.nn import _graph

__all__ = ["BeitAttention", "MaxxVitAttentionCl", "MaxxVitAttention2d", "beit_relative_position_index"]


def beit_relative_position_index(window_size: Tuple[int, int], device=None) -> Tensor:
    """(A+1, A+1) int64 index into BEiT's bias table, A = Wh·Ww; row/column 0 is the class token.

    Patch pairs get (dy + Wh - 1)·(2·Ww - 1) + (dx + Ww - 1) with (dy, dx) = query - key;
    the last three table rows are class -> patch (T - 3), patch -> class (T - 2) and class -> class
    (T - 1), T = (2·Wh - 1)·(2·Ww - 1) + 3.
    """
    wh, ww = window_size
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    patch = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)
    t = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.empty((wh * ww + 1,) * 2, dtype=torch.long, device=device)
    index[1:, 1:] = patch
    index[0, :] = t - 3
    index[:, 0] = t - 2
    index[0, 0] = t - 1
    return index


def _check_tokens(name: str, x, min_dims: int, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dims:
        raise ValueError(f"{name}: x must be {what}, got shape {tuple(x.shape)}")


def _check_bias(name: str, arg: str, bias) -> None:
    if bias is not None and not (isinstance(bias, Tensor) and bias.is_floating_point()):
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"{name}: {arg} must be a floating-point tensor or None, got {got}")


class BeitAttention(nn.Module):
    """timm ``beit.Attention`` on the fused attention op (see the module docstring).

    Args: as ``timm.models.beit.Attention``, plus
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to :func:`vitkern.ops.attention_packed`.
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qkv_bias_separate: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: Optional[Tuple[int, int]] = None,
        attn_head_dim: Optional[int] = None,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.backend = _backends.check_name(backend, "BeitAttention")
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"BeitAttention: num_heads must be a positive int, got {num_heads!r}")
        self.num_heads = num_heads
        head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        if head_dim <= 0:
            raise ValueError(f"BeitAttention: head_dim must be positive, got {head_dim} "
                             f"(dim={dim}, num_heads={num_heads}, attn_head_dim={attn_head_dim})")
        all_head_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.fused_attn = True  # timm's flag; vitkern's attention is always fused
        self.qkv_bias_separate = qkv_bias_separate

        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(all_head_dim, **dd))
            self.register_buffer("k_bias", torch.empty(all_head_dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.empty(all_head_dim, **dd))
        else:
            self.q_bias = None
            self.k_bias = None
            self.v_bias = None

        if window_size:
            self.window_size = window_size
            self.num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
            area = window_size[0] * window_size[1]
            self.relative_position_bias_table = nn.Parameter(torch.empty(self.num_relative_distance, num_heads, **dd))
            self.register_buffer("relative_position_index",
                                 torch.empty((area + 1, area + 1), device=device, dtype=torch.long), persistent=False)
        else:
            self.window_size = None
            self.relative_position_bias_table = None
            self.relative_position_index = None

        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}, backend={self.backend!r}"

    # ------------------------------------------------------------------ timm's methods
    def reset_parameters(self) -> None:
        """q/v biases and the bias table to zero, buffers recomputed (as timm)."""
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        if self.relative_position_bias_table is not None:
            nn.init.zeros_(self.relative_position_bias_table)
        self._init_buffers()

    def _init_buffers(self) -> None:
        if self.k_bias is not None:
            self.k_bias.zero_()
        if self.relative_position_index is not None:
            self.relative_position_index.copy_(
                beit_relative_position_index(self.window_size, device=self.relative_position_index.device))

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: Tuple[int, int]) -> None:
        """New window: the table is resampled with timm's ``resize_rel_pos_bias_table`` (needs timm)."""
        if self.window_size is None:
            return
        window_size = tuple(window_size) if isinstance(window_size, (tuple, list)) else (window_size, window_size)
        if window_size == tuple(self.window_size):
            return
        from timm.layers import resize_rel_pos_bias_table  # only reachable with a timm checkpoint / model

        old = self.window_size
        self.window_size = window_size
        self.num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3
        area = window_size[0] * window_size[1]
        table = self.relative_position_bias_table
        with torch.no_grad():
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(table, new_window_size=window_size,
                                          new_bias_shape=(self.num_relative_distance, self.num_heads),
                                          old_window_size=old),
                requires_grad=table.requires_grad)
        self.register_buffer("relative_position_index",
                             self.relative_position_index.new_empty((area + 1, area + 1)), persistent=False)
        self._init_buffers()

    def _get_rel_pos_bias(self) -> Tensor:
        """(1, h, A+1, A+1): the table gathered by index (a view; the op reads any strides)."""
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    # ------------------------------------------------------------------ forward
    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor, shared_rel_pos_bias: Optional[Tensor]) -> None:
        _check_tokens("BeitAttention", x, 3, "3-D (B, N, C)")
        if x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"BeitAttention: x must be 3-D (B, N, C) with C = dim = {self.qkv.in_features}, "
                             f"got shape {tuple(x.shape)}")
        _check_bias("BeitAttention", "shared_rel_pos_bias", shared_rel_pos_bias)
        N = x.shape[1]
        if self.relative_position_index is not None and N != self.relative_position_index.shape[0]:
            raise ValueError(f"BeitAttention: x has N = {N} tokens but the relative-position bias covers "
                             f"window_size={tuple(self.window_size)} + 1 class token = "
                             f"{self.relative_position_index.shape[0]}")

    def forward(self, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        if _graph.eager(x):
            self._check_input(x, shared_rel_pos_bias)
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)

        bias = None
        if self.relative_position_bias_table is not None:
            bias = self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                bias = bias + shared_rel_pos_bias
        elif shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias
        x = _graph.attention_packed(qkv, self.num_heads, self.scale, bias,
                                    self.attn_drop.p if self.training else 0.0, False,
                                    self.backend)  # (B, N, h·d), as timm's transpose + reshape
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class _MaxxVitAttention(nn.Module):
    """What AttentionCl and Attention2d share: timm's attributes, the bias choice, the op call."""

    fused_attn: torch.jit.Final[bool]

    def _build(self, name: str, layer: Callable, dim: int, dim_attn: int, dim_out: int, dim_head: int, bias: bool,
               head_first: bool, rel_pos_cls: Optional[Callable], attn_drop: float, proj_drop: float, dd: dict,
               backend: str) -> None:
        """timm's attributes and submodules, in timm's order; ``layer`` is the qkv / proj projection class."""
        self.backend = _backends.check_name(backend, name)
        if not isinstance(dim_head, int) or dim_head <= 0 or dim_attn % dim_head:
            raise ValueError(f"{name}: the attention dim {dim_attn} must be a positive multiple of "
                             f"dim_head, got dim_head={dim_head!r}")
        self.num_heads = dim_attn // dim_head
        self.dim_head = dim_head
        self.head_first = head_first
        self.scale = dim_head ** -0.5
        self.fused_attn = True  # timm's flag; vitkern's attention is always fused
        self.qkv = layer(dim, dim_attn * 3, bias=bias, **dd)
        self.rel_pos = rel_pos_cls(num_heads=self.num_heads, **dd) if rel_pos_cls else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = layer(dim_attn, dim_out, bias=bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dim_head={self.dim_head}, head_first={self.head_first}, " \
               f"backend={self.backend!r}"

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, shared_rel_pos: Optional[Tensor]) -> Tensor:
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        return _graph.attention(q, k, v, self.scale, bias, self.attn_drop.p if self.training else 0.0, False,
                                self.backend)  # (B, h, N, d)


class MaxxVitAttentionCl(_MaxxVitAttention):
    """timm ``maxxvit.AttentionCl`` (x (B, ..., C), channels last) on the fused attention op.

    Args: as ``timm.models.maxxvit.AttentionCl``, plus
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to :func:`vitkern.ops.attention`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: Optional[int] = None,
        dim_head: int = 32,
        bias: bool = True,
        expand_first: bool = True,
        head_first: bool = True,
        rel_pos_cls: Optional[Callable] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        dim_attn = dim_out if expand_first and dim_out > dim else dim
        self._build("MaxxVitAttentionCl", nn.Linear, dim, dim_attn, dim_out, dim_head, bias, head_first, rel_pos_cls,
                    attn_drop, proj_drop, dd, backend)

    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor, shared_rel_pos: Optional[Tensor]) -> None:
        _check_tokens("MaxxVitAttentionCl", x, 2, "(B, ..., C)")
        if x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"MaxxVitAttentionCl: x has {x.shape[-1]} channels (shape {tuple(x.shape)}) but the "
                             f"module was built with dim={self.qkv.in_features}")
        _check_bias("MaxxVitAttentionCl", "shared_rel_pos", shared_rel_pos)

    def forward(self, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        if _graph.eager(x):
            self._check_input(x, shared_rel_pos)
        B = x.shape[0]
        restore_shape = x.shape[:-1]
        h, d = self.num_heads, self.dim_head
        qkv = self.qkv(x)
        if self.head_first:  # channels [head][q | k | v][d]
            q, k, v = qkv.view(B, -1, h, 3 * d).transpose(1, 2).chunk(3, dim=3)
        else:  # channels [q | k | v][head][d]
            q, k, v = qkv.reshape(B, -1, 3, h, d).transpose(1, 3).unbind(2)
        out = self._attend(q, k, v, shared_rel_pos)  # a view of (B, N, h, d) on the Triton path: no copy below
        x = out.transpose(1, 2).reshape(restore_shape + (-1,))
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class MaxxVitAttention2d(_MaxxVitAttention):
    """timm ``maxxvit.Attention2d`` (x (B, C, H, W), NCHW, 1x1 conv projections) on the fused attention op.

    Tokens are the H·W positions in row-major order, head channels ordered as timm's (per head
    [q | k | v] when ``head_first``); the output is (B, dim_out, H, W), heads-major channels.

    Args: as ``timm.models.maxxvit.Attention2d``, plus
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to :func:`vitkern.ops.attention`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: Optional[int] = None,
        dim_head: int = 32,
        bias: bool = True,
        expand_first: bool = True,
        head_first: bool = True,
        rel_pos_cls: Optional[Callable] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        dim_attn = dim_out if expand_first else dim
        self._build("MaxxVitAttention2d", partial(nn.Conv2d, kernel_size=1), dim, dim_attn, dim_out, dim_head, bias,
                    head_first, rel_pos_cls, attn_drop, proj_drop, dd, backend)

    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor, shared_rel_pos: Optional[Tensor]) -> None:
        _check_tokens("MaxxVitAttention2d", x, 4, "4-D (B, C, H, W)")
        if x.dim() != 4 or x.shape[1] != self.qkv.in_channels:
            raise ValueError(f"MaxxVitAttention2d: x must be 4-D (B, C, H, W) with C = dim = "
                             f"{self.qkv.in_channels}, got shape {tuple(x.shape)}")
        _check_bias("MaxxVitAttention2d", "shared_rel_pos", shared_rel_pos)

    def forward(self, x: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        if _graph.eager(x):
            self._check_input(x, shared_rel_pos)
        B, _, H, W = x.shape
        h, d = self.num_heads, self.dim_head
        qkv = self.qkv(x)
        if self.head_first:  # channels [head][q | k | v][d]
            q, k, v = qkv.view(B, h, 3 * d, -1).chunk(3, dim=2)
        else:  # channels [q | k | v][head][d]
            q, k, v = qkv.reshape(B, 3, h, d, -1).unbind(1)
        # (B, h, d, N) -> (B, h, N, d) strided views: the kernel reads them in place
        out = self._attend(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), shared_rel_pos)
        x = out.transpose(-1, -2).reshape(B, -1, H, W)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x
