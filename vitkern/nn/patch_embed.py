"""Drop-in ``timm.layers.PatchEmbed`` whose projection runs vitkern's fused patchify op.

Same constructor (arguments, order, defaults), attributes, ``state_dict`` keys
(``proj.weight`` (D, C, Ph, Pw), ``proj.bias``, ``norm.*``), methods and forward
semantics as timm's module; the one addition is the keyword-only ``backend``.

The Conv2d -> flatten -> transpose of timm becomes one call of
:func:`vitkern.ops.patch_embed`, which writes (B, N, D) tokens directly; the other
output formats are views of those tokens. timm behaviours reproduced here:

* ``strict_img_size=True``: the input must be exactly ``img_size``; if ``img_size``
  is not a multiple of the patch, timm's Conv2d silently ignores the trailing
  rows/columns, so we hand the op a cropped *view* (the op reads through strides).
* ``strict_img_size=False`` without dynamic padding: H and W must be multiples of
  the patch.
* ``dynamic_img_pad=True``: zero-pad bottom/right up to a multiple of the patch.
* ``img_size=None``: no checks; trailing pixels are ignored as by Conv2d.
* ``output_fmt`` given -> ``flatten`` is forced off; ``norm`` is applied last, to
  whatever layout the output has.

Where timm asserts, this module raises :class:`ValueError` naming the argument, the
expected and the received value. vitkern imports without timm; only
``set_input_size(patch_size=...)`` (weight resampling) needs it.
"""

import math
from enum import Enum
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkern import backends as _backends
from vitkern._args import pair
from vitkern.nn import _graph

__all__ = ["PatchEmbed", "Format"]


class Format(str, Enum):
    """timm.layers.Format: a ``str`` enum, so it compares equal to timm's and to plain strings."""

    NCHW = "NCHW"
    NHWC = "NHWC"
    NCL = "NCL"
    NLC = "NLC"


class PatchEmbed(nn.Module):
    """2D image to patch embedding (timm.layers.PatchEmbed) on vitkern's fused patchify op.

    Args: as ``timm.layers.PatchEmbed``, plus
        backend: ``"auto" | "cuda" | "triton" | "torch"``, passed to
            :func:`vitkern.ops.patch_embed` (see :mod:`vitkern.backends`).
    """

    output_fmt: Format
    dynamic_img_pad: torch.jit.Final[bool]

    def __init__(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable] = None,
        flatten: bool = True,
        output_fmt: Optional[str] = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.backend = _backends.check_name(backend, "PatchEmbed")
        self.patch_size = pair(patch_size)
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

        if output_fmt is not None:
            self.flatten = False
            self.output_fmt = Format(output_fmt)
        else:
            # flatten spatial dims and transpose to channels last, as timm (kept for bwd compat there)
            self.flatten = flatten
            self.output_fmt = Format.NCHW
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad

        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    # ------------------------------------------------------------------ timm API
    def _init_img_size(self, img_size: Optional[Union[int, Tuple[int, int]]]):
        if not self.patch_size:
            raise ValueError(f"PatchEmbed: patch_size must be set, got {self.patch_size!r}")
        if img_size is None:
            return None, None, None
        img_size = pair(img_size)
        grid_size = tuple([s // p for s, p in zip(img_size, self.patch_size)])
        num_patches = grid_size[0] * grid_size[1]
        return img_size, grid_size, num_patches

    def set_input_size(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ):
        """Change the expected image size and/or the patch size (resampling ``proj.weight``, needs timm)."""
        new_patch_size = None
        if patch_size is not None:
            new_patch_size = pair(patch_size)
        if new_patch_size is not None and new_patch_size != self.patch_size:
            try:
                from timm.layers import resample_patch_embed
            except ImportError as exc:
                raise ImportError(
                    f"PatchEmbed.set_input_size: changing patch_size from {self.patch_size} to "
                    f"{new_patch_size} resamples proj.weight with timm's resample_patch_embed, and timm "
                    f"could not be imported ({exc}); install timm (pip install timm)") from exc
            with torch.no_grad():
                new_proj = nn.Conv2d(
                    self.proj.in_channels,
                    self.proj.out_channels,
                    kernel_size=new_patch_size,
                    stride=new_patch_size,
                    bias=self.proj.bias is not None,
                    device=self.proj.weight.device,
                    dtype=self.proj.weight.dtype,
                )
                new_proj.weight.copy_(resample_patch_embed(self.proj.weight, new_patch_size, verbose=True))
                new_proj.weight.requires_grad_(self.proj.weight.requires_grad)
                if self.proj.bias is not None:
                    new_proj.bias.copy_(self.proj.bias)
                    new_proj.bias.requires_grad_(self.proj.bias.requires_grad)
                new_proj.train(self.proj.training)
                self.proj = new_proj
            self.patch_size = new_patch_size
        img_size = img_size or self.img_size
        if img_size != self.img_size or new_patch_size is not None:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def feat_ratio(self, as_scalar=True) -> Union[Tuple[int, int], int]:
        if as_scalar:
            return max(self.patch_size)
        return self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Grid (feature) size for an image size, taking dynamic padding into account."""
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    # ------------------------------------------------------------------ forward
    @torch.jit.unused  # scripted forwards leave the checks to the op (see vitkern.nn._graph)
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"PatchEmbed: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"PatchEmbed: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        in_chans = self.proj.in_channels
        if C != in_chans:
            raise ValueError(f"PatchEmbed: x has {C} channels (shape {tuple(x.shape)}) but the module was "
                             f"built with in_chans={in_chans}")
        if self.img_size is None:
            return
        ph, pw = self.patch_size
        if self.strict_img_size:
            if (H, W) != tuple(self.img_size):
                raise ValueError(
                    f"PatchEmbed: input image size (H, W)=({H}, {W}) does not match img_size="
                    f"{tuple(self.img_size)} (strict_img_size=True); resize the input, or build with "
                    f"strict_img_size=False (and dynamic_img_pad=True for sizes not divisible by the patch)")
        elif not self.dynamic_img_pad and (H % ph or W % pw):
            raise ValueError(
                f"PatchEmbed: input image size (H, W)=({H}, {W}) must be divisible by patch_size=({ph}, {pw}) "
                f"when strict_img_size=False and dynamic_img_pad=False; build with dynamic_img_pad=True "
                f"to zero-pad it")

    def forward(self, x: Tensor) -> Tensor:
        if _graph.eager(x):
            self._check_input(x)
        ph, pw = self.patch_size
        H, W = x.shape[-2], x.shape[-1]
        if self.dynamic_img_pad:
            pad_h = (ph - H % ph) % ph
            pad_w = (pw - W % pw) % pw
            # Traced sizes cannot be branched on: a graph always pads (by zero rows when divisible).
            if not _graph.eager(x) or pad_h > 0 or pad_w > 0:
                x = F.pad(x, (0, pad_w, 0, pad_h))
                H, W = H + pad_h, W + pad_w
        gh, gw = H // ph, W // pw
        # Conv2d(stride=kernel) ignores the trailing rows/columns: a strided view, no copy.
        x = x[..., : gh * ph, : gw * pw]
        tokens = _graph.patch_embed(x, self.proj.weight, self.proj.bias, None, None, self.backend)  # (B, N, D)
        if self.flatten:
            x = tokens  # NLC, as timm's flatten(2).transpose(1, 2)
        else:
            x = self._format(tokens, gh, gw)
        return self.norm(x)

    def _format(self, tokens: Tensor, gh: int, gw: int) -> Tensor:
        """(B, N, D) tokens -> self.output_fmt (timm's nchw_to applied to the Conv2d output)."""
        fmt = self.output_fmt
        if fmt == Format.NLC:
            return tokens
        if fmt == Format.NCL:
            return tokens.transpose(1, 2)
        nhwc = tokens.unflatten(1, (gh, gw))  # (B, gh, gw, D), a view
        if fmt == Format.NHWC:
            return nhwc
        return nhwc.permute(0, 3, 1, 2)  # NCHW
