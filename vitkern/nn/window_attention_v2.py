"""Drop-in timm ``swin_transformer_v2`` modules on vitkern's window op: cosine attention, CPB table.

* :class:`SwinTransformerV2Block` - timm ``SwinTransformerV2Block`` (post-norm:
  ``x + drop_path1(norm1(_attn(x)))``, then ``x + drop_path2(norm2(mlp(x)))``). Its ``_attn``
  runs the qkv Linear on the (B, H, W, C) grid and hands the rest (roll, pad, windows, cosine
  scores, bias, shift mask, softmax, merge, crop, roll back) to one window-op call::

      qkv = F.linear(x, attn.qkv.weight, cat(q_bias, k_bias, v_bias))    # (B, H, W, 3C)
      table = 16 * sigmoid(attn.cpb_mlp(attn.relative_coords_table))     # ((2Mh-1)(2Mw-1), heads)
      y = window_attention(qkv, table, ..., qkv_bias=cat(...), logit_scale=attn.logit_scale)
      y = attn.proj_drop(attn.proj(y))

  The continuous position-bias MLP runs once per call on the (2Mh-1)(2Mw-1) relative
  coordinates (tiny), so the op stays table-based; the raw ``logit_scale`` goes to the op, which
  applies timm's clamp(max=log(100)).exp().
* :class:`WindowAttention` - timm V2 ``WindowAttention``: the same parameters (``logit_scale``
  (heads, 1, 1), ``cpb_mlp``, ``qkv`` without bias, ``q_bias`` / ``v_bias``), buffers (``k_bias``,
  ``relative_coords_table``, ``relative_position_index``, all non-persistent as in timm) and
  windows interface ``forward(x (B*nW, N, C), mask=None)`` (on the window op without a mask; with
  a mask, which the op cannot take, in PyTorch).

Same constructor arguments, order and defaults as timm 1.0.31 plus a keyword-only ``backend``;
same attributes and ``state_dict`` keys, so weights load strictly both ways. Window rules
(small grid, ``always_partition``, ``dynamic_mask``, stale-mask check, ``set_input_size``) are
the V1 block's (:class:`vitkern.nn.SwinTransformerBlock`), whose methods this block shares. With
a changed window, ``set_window_size`` recomputes the coordinates table (the MLP is continuous:
nothing to resample, as in timm).

Deliberate differences from timm (errors instead of silent behaviour): ``dim`` not divisible by
``num_heads``, ``shift_size >= window_size`` and wrong input shapes raise ValueError naming the
argument; an empty batch gives an empty output.
"""
import math
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern.nn import _graph
from vitkern._args import pair
from vitkern.nn.window_attention import DropPath, Mlp, SwinTransformerBlock
from vitkern.reference import relative_position_index

__all__ = ["SwinTransformerV2Block", "WindowAttention", "relative_coords_table"]

_int_or_tuple_2_t = Union[int, Tuple[int, int]]
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm's clamp on the logit scale: at most 100


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def relative_coords_table(window_size: _int_or_tuple_2_t, pretrained_window_size: _int_or_tuple_2_t = 0,
                          device=None, dtype=None) -> Tensor:
    """(1, 2Mh-1, 2Mw-1, 2) log-spaced relative coordinates, the CPB MLP's input (timm V2's table).

    Offsets (dy, dx) are scaled to [-8, 8] by (pretrained) window - 1, then mapped through
    sign(t) * log2(|t| + 1) / 3; computed in float32 as timm does, then cast to ``dtype``.
    """
    mh, mw = pair(window_size)
    ph, pw = pair(pretrained_window_size)
    norm_h, norm_w = (ph, pw) if ph > 0 else (mh, mw)
    dy = torch.arange(-(mh - 1), mh, device=device, dtype=torch.float32) / max(norm_h - 1, 1)
    dx = torch.arange(-(mw - 1), mw, device=device, dtype=torch.float32) / max(norm_w - 1, 1)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).unsqueeze(0) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.to(dtype=dtype)


def _act_layer(act_layer) -> Type[nn.Module]:
    """timm's ``get_act_layer`` for a name (timm's own classes when timm is there), else the class given."""
    if not isinstance(act_layer, str):
        return act_layer
    try:
        from timm.layers import get_act_layer
    except ImportError:
        fallback = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
        if act_layer not in fallback:
            raise ValueError(f"SwinTransformerV2Block: act_layer {act_layer!r} needs timm's get_act_layer (timm is "
                             f"not installed); pass an nn.Module class or one of {sorted(fallback)}") from None
        return fallback[act_layer]
    return get_act_layer(act_layer)


# --------------------------------------------------------------------------- #
# WindowAttention (timm V2): parameters, buffers, windows interface
# --------------------------------------------------------------------------- #
class WindowAttention(nn.Module):
    """timm ``swin_transformer_v2.WindowAttention``'s parameters, buffers and windows API.

    :class:`SwinTransformerV2Block` reads them to call the window op on the whole grid.
    :meth:`forward` keeps timm's windows interface ((B*nW, N, C) windows, optional (nW, N, N)
    additive mask): on the window op (each window its own grid) without a mask, in PyTorch with one.

    Args: as timm's, plus ``backend`` (``"auto" | "cuda" | "triton" | "torch"``) for :meth:`forward`.
    """

    def __init__(
        self,
        dim: int,
        window_size: Tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        qkv_bias_separate: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: Tuple[int, int] = (0, 0),
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        owner = type(self).__name__
        self.backend = _backends.check_name(backend, owner)
        if not _is_int(dim) or dim <= 0:
            raise ValueError(f"{owner}: dim must be a positive int, got {dim!r}")
        if not _is_int(num_heads) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"{owner}: num_heads must be a positive divisor of dim={dim}, got {num_heads!r}")
        self.dim = dim
        self.window_size = pair(window_size, "window_size", owner, minimum=1)
        self.pretrained_window_size = pair(pretrained_window_size, "pretrained_window_size", owner, minimum=0)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate

        # registration order as timm's: the state_dict keys come out in the same order
        self.logit_scale = nn.Parameter(torch.empty((num_heads, 1, 1), **dd))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True, **dd),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_heads, bias=False, **dd),
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim, **dd))
            self.register_buffer("k_bias", torch.empty(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.q_bias = None
            self.k_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        win_h, win_w = self.window_size
        self.register_buffer("relative_coords_table", torch.empty(1, 2 * win_h - 1, 2 * win_w - 1, 2, **dd),
                             persistent=False)
        self.register_buffer("relative_position_index",
                             torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, math.log(10))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)
        self._init_buffers()

    def _init_buffers(self) -> None:
        if self.k_bias is not None:
            self.k_bias.zero_()
        device, dtype = self.proj.weight.device, self.proj.weight.dtype
        self.relative_coords_table.copy_(
            relative_coords_table(self.window_size, self.pretrained_window_size, device=device, dtype=dtype))
        self.relative_position_index.copy_(relative_position_index(self.window_size, device=device))

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: _int_or_tuple_2_t) -> None:
        """A new window: new coordinates table and index (the CPB MLP itself is unchanged), as timm."""
        window_size = pair(window_size, "window_size", type(self).__name__, minimum=1)
        if window_size == self.window_size:
            return
        device, dtype = self.relative_coords_table.device, self.relative_coords_table.dtype
        self.window_size = window_size
        self.register_buffer("relative_coords_table",
                             relative_coords_table(window_size, self.pretrained_window_size, device, dtype),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window_size, device=device),
                             persistent=False)

    # ------------------------------------------------------------------ pieces the block uses
    def qkv_and_bias(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """(qkv Linear output, its bias cat(q_bias, k_bias, v_bias) or None), as timm computes them."""
        if self.q_bias is None:
            return self.qkv(x), None
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            return self.qkv(x) + bias, bias
        return F.linear(x, weight=self.qkv.weight, bias=bias), bias

    def bias_table(self) -> Tensor:
        """((2Mh-1)(2Mw-1), heads): 16 * sigmoid(cpb_mlp(relative_coords_table)), the op's final bias table."""
        return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))

    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor, mask: Optional[Tensor]) -> None:
        owner = type(self).__name__
        n = self.window_size[0] * self.window_size[1]
        if x.dim() != 3 or x.shape[1] != n or x.shape[2] != self.dim:
            raise ValueError(f"{owner}: x must be (B*nW, N={n}, C={self.dim}) windows, got shape {tuple(x.shape)}")
        if mask is None:
            return
        B_, N, _ = x.shape
        num_win = mask.shape[0] if mask.dim() == 3 else 0
        if mask.dim() != 3 or mask.shape[1:] != (N, N) or num_win == 0 or B_ % num_win:
            raise ValueError(f"{owner}: mask must be (nW, {N}, {N}) with B*nW={B_} a multiple of nW, "
                             f"got shape {tuple(mask.shape)}")
        if self.backend in ("triton", "cuda"):
            raise _backends.BackendUnavailableError(
                f"{owner}: backend={self.backend!r} cannot run the windows interface with a mask: the fused window "
                f"op takes no arbitrary mask (it builds the shift mask itself; SwinTransformerV2Block needs none). "
                f"Use backend='auto' or 'torch' here")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Cosine attention within windows x (B*nW, N, C), N = window area; mask (nW, N, N) additive, or None.

        Without a mask: the window op, each window a grid of its own (q, k normalised in-kernel). With a
        mask: the op cannot take an arbitrary mask (it builds the shift mask itself), so this runs the
        reference math in PyTorch, and an explicit "triton" / "cuda" backend raises.
        """
        if _graph.eager(x):
            self._check_input(x, mask)
        mh, mw = self.window_size[0], self.window_size[1]
        heads = self.num_heads
        B_, N, C = x.shape
        qkv, _ = self.qkv_and_bias(x)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if mask is None:
            y = _graph.window_attention(qkv.reshape(B_, mh, mw, 3 * C), self.bias_table(), heads, (mh, mw), (0, 0),
                                        None, None, dropout_p, self.backend, logit_scale=self.logit_scale)
            return self.proj_drop(self.proj(y.reshape(B_, N, C)))
        num_win = mask.shape[0]
        q, k, v = qkv.reshape(B_, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, heads, N, d)
        q = F.normalize(q, dim=-1) * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()  # LOGIT_SCALE_MAX
        k = F.normalize(k, dim=-1)
        table = self.bias_table()
        bias = table[self.relative_position_index.view(-1)].view(N, N, heads).permute(2, 0, 1)
        # windows w of every image share mask[w]: the heads of the nW windows side by side, broadcast over B
        bias = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)).reshape(1, num_win * heads, N, N)
        shape = [B_ // num_win, num_win * heads, N, C // heads]
        scores = q.reshape(shape) @ k.reshape(shape).transpose(-2, -1) + bias
        probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=dropout_p > 0.0)
        y = probs @ v.reshape(shape)
        y = y.reshape(B_, heads, N, C // heads).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(y))


# --------------------------------------------------------------------------- #
# SwinTransformerV2Block
# --------------------------------------------------------------------------- #
class SwinTransformerV2Block(nn.Module):
    """Swin V2 block (timm ``swin_transformer_v2.SwinTransformerV2Block``) on vitkern's window op.

    Args: as timm's block, plus ``backend``: ``"auto" | "cuda" | "triton" | "torch"``, passed to
    the window op.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: _int_or_tuple_2_t,
        num_heads: int,
        window_size: _int_or_tuple_2_t = 7,
        shift_size: _int_or_tuple_2_t = 0,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Union[str, Type[nn.Module]] = "gelu",
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        pretrained_window_size: _int_or_tuple_2_t = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        owner = type(self).__name__
        self.backend = _backends.check_name(backend, owner)
        if not _is_int(dim) or dim <= 0:
            raise ValueError(f"{owner}: dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.input_resolution = pair(input_resolution, "input_resolution", owner, minimum=1)
        pair(window_size, "window_size", owner, minimum=1)
        self.num_heads = num_heads
        self.target_shift_size = pair(shift_size, "shift_size", owner, minimum=0)  # kept for resizes
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask
        self.window_size, self.shift_size = self._calc_window_shift(window_size, shift_size)
        self._check_window_shift()
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        act_layer = _act_layer(act_layer)

        # registration order as timm's (attn, norm1, drop_path1, mlp, norm2, drop_path2)
        self.attn = WindowAttention(
            dim,
            window_size=self.window_size,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            pretrained_window_size=pair(pretrained_window_size, "pretrained_window_size", owner, minimum=0),
            **dd,
            backend=backend,
        )
        self.norm1 = norm_layer(dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop,
                       **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        # timm registers its precomputed shift mask here (non-persistent); the window op needs none.
        self.register_buffer("attn_mask", None, persistent=False)

    # The window bookkeeping is the V1 block's, unchanged (timm's two blocks share the same rules).
    extra_repr = SwinTransformerBlock.extra_repr
    reset_parameters = SwinTransformerBlock.reset_parameters
    _init_buffers = SwinTransformerBlock._init_buffers
    init_non_persistent_buffers = SwinTransformerBlock.init_non_persistent_buffers
    get_attn_mask = SwinTransformerBlock.get_attn_mask
    _calc_window_shift = SwinTransformerBlock._calc_window_shift
    _check_window_shift = SwinTransformerBlock._check_window_shift
    set_input_size = SwinTransformerBlock.set_input_size
    _padded = SwinTransformerBlock._padded
    _check_input = SwinTransformerBlock._check_input

    def _attn(self, x: Tensor) -> Tensor:
        """Shifted-window cosine attention of the grid x (B, H, W, C), including attn.proj (timm's _attn)."""
        attn = self.attn
        qkv, qkv_bias = attn.qkv_and_bias(x)  # (B, H, W, 3C); padded tokens are zeros before it: the bias
        y = _graph.window_attention(
            qkv,
            attn.bias_table(),
            attn.num_heads,
            self.window_size,
            self.shift_size,
            None,
            qkv_bias,
            attn.attn_drop.p if self.training else 0.0,
            self.backend,
            logit_scale=attn.logit_scale,
        )  # (B, H, W, C)
        return attn.proj_drop(attn.proj(y))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) -> (B, H, W, C); post-norm residuals as timm V2."""
        if _graph.eager(x):
            self._check_input(x)
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x.reshape(B, H * W, C)  # not (B, -1, C): that cannot reshape an empty batch
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)
