"""Drop-in timm ``swin_transformer.SwinTransformerBlock`` whose attention runs vitkern's fused window op.

Same constructor (arguments, order, defaults, as timm 1.0.31), attributes (``dim``,
``input_resolution``, ``window_size``, ``shift_size``, ``target_shift_size``, ``window_area``,
``always_partition``, ``dynamic_mask``, ``mlp_ratio``), submodules (``norm1``, ``attn``,
``drop_path1``, ``norm2``, ``mlp``, ``drop_path2``), buffers (``attn.relative_position_index``
and ``attn_mask``, both non-persistent as in timm) and ``state_dict`` keys
(``norm1.*``, ``attn.relative_position_bias_table``, ``attn.qkv.*``, ``attn.proj.*``,
``norm2.*``, ``mlp.fc1.*``, ``mlp.fc2.*``), so weights load strictly in both directions.
Methods as timm's: ``set_input_size(feat_size, window_size, always_partition=None)``
(with timm's small-grid rule, :meth:`SwinTransformerBlock._calc_window_shift`),
``get_attn_mask``, ``reset_parameters``, ``init_non_persistent_buffers``, ``_attn``.
The one addition is the keyword-only ``backend``.

Forward on x (B, H, W, C), as timm::

    x = x + drop_path1(_attn(norm1(x)))
    x = x + drop_path2(mlp(norm2(x)))      # on the (B, H*W, C) view, reshaped back

``_attn`` is where timm rolls, pads, partitions into windows, builds the bias + mask,
attends, merges, crops and rolls back. Here it is::

    qkv = attn.qkv(x)                      # (B, H, W, 3C) on the grid: no roll/pad/partition copies
    y   = vitkern.ops.window_attention(qkv, attn.relative_position_bias_table,
              num_heads, window_size=self.window_size, shift_size=self.shift_size,
              scale=attn.scale, qkv_bias=attn.qkv.bias,
              dropout_p=attn.attn_drop.p if self.training else 0.0, backend=self.backend)
    y   = attn.proj_drop(attn.proj(y))

The op does the cyclic shift, padding (padded tokens are timm's zero tokens after the qkv
Linear, i.e. the qkv bias), relative-position bias, shift mask (-100, as timm) and the
window merge itself, reading and writing the (B, H, W, ·) grid.

Window / shift, and inputs of another size. timm fixes the (effective) window and shift
from ``input_resolution`` at construction / ``set_input_size`` (a grid dimension no larger
than the window gets one window of the grid's size and no shift, unless
``always_partition``), never from the actual input; this module does the same. The shift
mask depends only on the padded grid, the window and the shift. With ``dynamic_mask=True``
timm builds it from the actual (padded) input, exactly what the op does. With
``dynamic_mask=False`` timm uses the mask precomputed for ``input_resolution``; when the
block shifts and the actual grid pads to a different size than ``input_resolution`` does,
that stale mask does not fit (timm then fails with a shape error, or, when the window count
happens to agree, silently masks the wrong pairs). This module raises a ValueError in
exactly that case and otherwise equals timm (an unshifted block, or a grid that pads to
the same size, works for any input as in timm).

``attn_mask`` is registered (non-persistent, as in timm) but stays ``None``: the op needs no
mask tensor. :meth:`SwinTransformerBlock.get_attn_mask` still returns timm's mask.

Attention dropout. In training mode the op gets ``dropout_p=attn.attn_drop.p`` (0 in eval, as
timm's ``attn_drop``): the Triton kernels drop the probabilities in-kernel (Philox numbers from a
seed drawn from torch's default generator, the same in forward and backward), so the fused path
covers training too. With backend="torch" the reference drops them with ``F.dropout`` on the
(B, nW, heads, n, n) probabilities - timm's ``attn_drop`` elements in timm's order, so with
``proj_drop == 0`` a training step equals timm's (``fused_attn=False``) under the same seed.
``proj_drop`` (after ``attn.proj``, on the grid instead of timm's windows) and ``drop_path``
(per sample, as timm's ``DropPath``) apply as in timm; proj_drop's random pattern is laid out on
the grid rather than per window.

Deliberate differences from timm (errors instead of silent behaviour):

* ``head_dim=None`` with ``dim`` not divisible by ``num_heads``: timm silently uses
  ``dim // num_heads`` channels per head (attention width < dim); this raises and says
  to pass ``head_dim`` explicitly to get timm's layout.
* ``shift_size >= window_size`` (after the small-grid rule), non-positive windows and
  negative shifts raise; timm builds a meaningless mask.
* Wrong input rank / channels raise ValueError (timm: unpacking / matmul errors).
* An empty batch (B = 0) returns an empty (0, H, W, C) output (and empty / zero gradients);
  timm 1.0.31 raises a reshape error there.

vitkern imports without timm. Only ``set_input_size`` with a *different* window size (which
resamples ``attn.relative_position_bias_table`` with timm's ``resize_rel_pos_bias_table``)
needs it.
"""

import math
from typing import Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern.nn import _graph
from vitkern._args import pair
from vitkern.reference import _shift_mask, relative_position_index

__all__ = ["SwinTransformerBlock", "WindowAttention", "Mlp", "DropPath"]

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------- #
# Small timm building blocks (vitkern must import without timm)
# --------------------------------------------------------------------------- #
def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """timm.layers.drop_path: drop whole samples of a residual branch (same random-number use as timm)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm.layers.DropPath: stochastic depth per sample."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class Mlp(nn.Module):
    """timm.layers.Mlp (Linear variant): fc1 -> act -> drop1 -> norm -> fc2 -> drop2."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias = pair(bias)
        drop_probs = pair(drop)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias[0], **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop_probs[1])

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


# --------------------------------------------------------------------------- #
# WindowAttention: timm's parameters and buffers; the block drives the fused op
# --------------------------------------------------------------------------- #
class WindowAttention(nn.Module):
    """timm ``swin_transformer.WindowAttention``'s parameters, buffers and windows API.

    Holds ``relative_position_bias_table`` ((2Mh-1)(2Mw-1), heads), the non-persistent
    ``relative_position_index`` buffer, ``qkv``, ``attn_drop``, ``proj``, ``proj_drop`` and
    ``softmax`` under timm's names. :class:`SwinTransformerBlock` reads them to call the fused
    window op on the whole token grid (no partitioned windows). :meth:`forward` keeps timm's
    windows interface for code that calls it directly: already-partitioned windows
    (B*nW, N, C) and an optional (nW, N, N) additive mask, attended by vitkern's fused
    attention op (:func:`vitkern.ops.attention_packed` on the qkv Linear's output) with the
    relative-position bias as ``attn_bias``. That bias is the small (1, heads, N, N) gather of
    the table, and with a mask it is (B*nW, heads, N, N), since a mask that repeats every nW
    windows is not a broadcast the op can express: this windows interface is for
    compatibility; the block's grid path needs neither.

    Args: as timm's ``WindowAttention``, plus
        backend: ``"auto" | "cuda" | "triton" | "torch"`` for :meth:`forward` (the block passes
            its own).
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: Optional[int] = None,
        window_size: _int_or_tuple_2_t = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
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
        if not _is_int(num_heads) or num_heads <= 0:
            raise ValueError(f"{owner}: num_heads must be a positive int, got {num_heads!r}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(
                    f"{owner}: dim={dim} must be divisible by num_heads={num_heads} when head_dim is not "
                    f"given (timm would silently use head_dim = dim // num_heads = {dim // num_heads}, an "
                    f"attention width of {dim // num_heads * num_heads} != dim; pass head_dim explicitly "
                    f"for that layout)")
            head_dim = dim // num_heads
        elif not _is_int(head_dim) or head_dim <= 0:
            raise ValueError(f"{owner}: head_dim must be a positive int or None, got {head_dim!r}")
        self.dim = dim
        self.window_size = pair(window_size, "window_size", owner, minimum=1)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.fused_attn = False  # timm's flag and its default (timm: experimental); vitkern's attention is fused either way

        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
        self.register_buffer(
            "relative_position_index",
            torch.empty(win_h * win_w, win_h * win_w, device=device, dtype=torch.long),
            persistent=False,
        )
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        index = relative_position_index(self.window_size, device=self.relative_position_index.device)
        self.relative_position_index.copy_(index)

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_window_size(self, window_size: _int_or_tuple_2_t) -> None:
        """Change the window, resampling the bias table as timm does (needs timm when it changes)."""
        window_size = pair(window_size, "window_size", type(self).__name__, minimum=1)
        if window_size == self.window_size:
            return
        try:
            from timm.layers import resize_rel_pos_bias_table
        except ImportError as exc:
            raise ImportError(
                f"{type(self).__name__}.set_window_size: changing window_size from {self.window_size} to "
                f"{window_size} resamples relative_position_bias_table with timm's resize_rel_pos_bias_table, "
                f"and timm could not be imported ({exc}); install timm (pip install timm)") from exc
        old_window_size = self.window_size
        self.window_size = window_size
        win_h, win_w = window_size
        self.window_area = win_h * win_w
        with torch.no_grad():
            new_bias_shape = (2 * win_h - 1) * (2 * win_w - 1), self.num_heads
            self.relative_position_bias_table = nn.Parameter(
                resize_rel_pos_bias_table(
                    self.relative_position_bias_table,
                    new_window_size=window_size,
                    new_bias_shape=new_bias_shape,
                    old_window_size=old_window_size,
                ),
                requires_grad=self.relative_position_bias_table.requires_grad,
            )
            self.register_buffer(
                "relative_position_index",
                relative_position_index(window_size, device=self.relative_position_bias_table.device),
                persistent=False,
            )

    def _get_rel_pos_bias(self) -> Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)  # (1, heads, N, N)

    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor, mask: Optional[Tensor]) -> None:
        owner = type(self).__name__
        if x.dim() != 3 or x.shape[1] != self.window_area or x.shape[2] != self.dim:
            raise ValueError(f"{owner}: x must be (B*nW, N={self.window_area}, C={self.dim}) windows, "
                             f"got shape {tuple(x.shape)}")
        B_, N, _ = x.shape
        if mask is not None:
            num_win = mask.shape[0]
            if mask.dim() != 3 or mask.shape[1:] != (N, N) or (num_win and B_ % num_win):
                raise ValueError(f"{owner}: mask must be (nW, {N}, {N}) with B*nW={B_} a multiple of nW, "
                                 f"got shape {tuple(mask.shape)}")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Attention within windows x (B*nW, N, C), N = window area; mask (nW, N, N) additive, or None."""
        if _graph.eager(x):
            self._check_input(x, mask)
        B_, N, _ = x.shape
        bias = self._get_rel_pos_bias()  # (1, heads, N, N)
        if mask is not None:
            num_win = mask.shape[0]
            bias = bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0).to(bias.dtype)  # (1, nW, heads, N, N)
            bias = bias.expand(B_ // max(num_win, 1), -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        y = _graph.attention_packed(self.qkv(x), self.num_heads, self.scale, bias,
                                    self.attn_drop.p if self.training else 0.0, False, self.backend)
        y = self.proj(y)
        return self.proj_drop(y)


# --------------------------------------------------------------------------- #
# SwinTransformerBlock
# --------------------------------------------------------------------------- #
class SwinTransformerBlock(nn.Module):
    """Swin Transformer block (timm ``swin_transformer.SwinTransformerBlock``) on vitkern's fused window op.

    Args: as timm's block, plus
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to
            :func:`vitkern.ops.window_attention`.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: _int_or_tuple_2_t,
        num_heads: int = 4,
        head_dim: Optional[int] = None,
        window_size: _int_or_tuple_2_t = 7,
        shift_size: int = 0,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
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
        pair(input_resolution, "input_resolution", owner, minimum=1)
        pair(window_size, "window_size", owner, minimum=1)
        self.dim = dim
        self.input_resolution = input_resolution
        self.target_shift_size = pair(shift_size, "shift_size", owner, minimum=0)  # kept for resizes
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask
        self.window_size, self.shift_size = self._calc_window_shift(window_size, shift_size)
        self._check_window_shift()
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio

        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttention(
            dim,
            num_heads=num_heads,
            head_dim=head_dim,
            window_size=self.window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            **dd,
            backend=backend,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            drop=proj_drop,
            **dd,
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        # timm registers its precomputed shift mask here (non-persistent); the fused op needs none.
        self.register_buffer("attn_mask", None, persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, backend={self.backend!r}")

    # ------------------------------------------------------------------ timm API
    def reset_parameters(self) -> None:
        self._init_buffers()

    def _init_buffers(self) -> None:
        """timm recomputes its precomputed mask here; vitkern keeps ``attn_mask`` None (nothing to do)."""

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def get_attn_mask(
        self,
        x: Optional[Tensor] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Optional[Tensor]:
        """timm's shift mask (nW, N, N): 0 / -100 for the padded grid x (or ``input_resolution``).

        None when the block is not shifted. The block itself never builds it (the op masks on the fly).
        """
        if not any(self.shift_size):
            return None
        if x is not None:
            H, W = x.shape[1], x.shape[2]
            device, dtype = x.device, x.dtype
        else:
            H, W = self._padded(pair(self.input_resolution))
        if dtype is None:
            dtype = torch.get_default_dtype()
        return _shift_mask((H, W), self.window_size, self.shift_size, -100.0, dtype, device)

    def _calc_window_shift(
        self,
        target_window_size: _int_or_tuple_2_t,
        target_shift_size: Optional[_int_or_tuple_2_t] = None,
    ) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """timm's rule: a grid dimension <= the window gets one window of the grid's size and no shift."""
        target_window_size = pair(target_window_size)
        if target_shift_size is None:
            # None: window // 2 if the block was built shifted, else 0 (timm)
            target_shift_size = self.target_shift_size
            if any(target_shift_size):
                target_shift_size = (target_window_size[0] // 2, target_window_size[1] // 2)
        else:
            target_shift_size = pair(target_shift_size)
        if self.always_partition:
            return target_window_size, target_shift_size
        resolution = pair(self.input_resolution)
        window_size = [r if r <= w else w for r, w in zip(resolution, target_window_size)]
        shift_size = [0 if r <= w else s for r, w, s in zip(resolution, window_size, target_shift_size)]
        return tuple(window_size), tuple(shift_size)

    def _check_window_shift(self) -> None:
        owner = type(self).__name__
        window, shift = self.window_size, self.shift_size
        if not (len(window) == 2 and all(_is_int(w) and w > 0 for w in window)):
            raise ValueError(f"{owner}: window_size must be positive ints, got {window}")
        if not (len(shift) == 2 and all(_is_int(s) and 0 <= s < w for s, w in zip(shift, window))):
            raise ValueError(
                f"{owner}: shift_size must satisfy 0 <= shift_size < window_size per dimension, got "
                f"shift_size={shift} for window_size={window} (input_resolution={self.input_resolution}, "
                f"always_partition={self.always_partition})")

    def set_input_size(
        self,
        feat_size: Tuple[int, int],
        window_size: Tuple[int, int],
        always_partition: Optional[bool] = None,
    ):
        """New input resolution and window (shift = window // 2 if the block shifts), as timm."""
        owner = type(self).__name__
        pair(feat_size, "feat_size", owner, minimum=1)
        pair(window_size, "window_size", owner, minimum=1)
        old = (self.input_resolution, self.always_partition, self.window_size, self.shift_size)
        self.input_resolution = feat_size
        if always_partition is not None:
            self.always_partition = always_partition
        self.window_size, self.shift_size = self._calc_window_shift(window_size)
        try:
            self._check_window_shift()
        except ValueError:
            self.input_resolution, self.always_partition, self.window_size, self.shift_size = old
            raise
        self.window_area = self.window_size[0] * self.window_size[1]
        self.attn.set_window_size(self.window_size)
        self._init_buffers()

    # ------------------------------------------------------------------ forward
    def _padded(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        (h, w), (wh, ww) = grid, self.window_size
        return math.ceil(h / wh) * wh, math.ceil(w / ww) * ww

    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor) -> None:
        owner = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{owner}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{owner}: x must be 4-D (B, H, W, C), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{owner}: x has {x.shape[-1]} channels (shape {tuple(x.shape)}) but the block was "
                             f"built with dim={self.dim}")
        if any(self.shift_size) and not self.dynamic_mask:
            grid = (x.shape[1], x.shape[2])
            padded, expected = self._padded(grid), self._padded(pair(self.input_resolution))
            if padded != expected:
                raise ValueError(
                    f"{owner}: x has a {grid[0]}x{grid[1]} token grid (shape {tuple(x.shape)}), padded to "
                    f"{padded[0]}x{padded[1]} for window_size={self.window_size}, but the block was built for "
                    f"input_resolution={tuple(pair(self.input_resolution))} (padded "
                    f"{expected[0]}x{expected[1]}); with shift_size={self.shift_size} and dynamic_mask=False "
                    f"timm uses the shift mask precomputed for input_resolution, which does not fit this grid. "
                    f"Call set_input_size(({grid[0]}, {grid[1]}), window_size) first, or build the block with "
                    f"dynamic_mask=True")

    def _attn(self, x: Tensor) -> Tensor:
        """Shifted-window attention of the normalised grid x (B, H, W, C), including attn.proj (timm's _attn)."""
        attn = self.attn
        qkv = attn.qkv(x)  # (B, H, W, 3·heads·head_dim)
        y = _graph.window_attention(
            qkv,
            attn.relative_position_bias_table,
            attn.num_heads,
            self.window_size,
            self.shift_size,
            attn.scale,
            attn.qkv.bias,
            attn.attn_drop.p if self.training else 0.0,
            self.backend,
        )  # (B, H, W, heads·head_dim)
        y = attn.proj(y)
        return attn.proj_drop(y)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        if _graph.eager(x):
            self._check_input(x)
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, H * W, C)  # not (B, -1, C): that cannot reshape an empty batch
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x.reshape(B, H, W, C)
        return x
