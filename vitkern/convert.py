"""``vitkern.optimize(model)``: swap vitkern's drop-in modules into a timm model, in place.

What is replaced (exact classes only; subclasses are skipped, see below):

=====================================================  =====================================
timm module                                            vitkern replacement
=====================================================  =====================================
``timm.layers.PatchEmbed``                             :class:`vitkern.nn.PatchEmbed`
``timm.layers.Attention`` (= ``vision_transformer``'s)  :class:`vitkern.nn.Attention`
``timm.models.swin_transformer.SwinTransformerBlock``  :class:`vitkern.nn.SwinTransformerBlock`
``timm.models.pvt_v2.Attention``                       :class:`vitkern.nn.SRAttention`
``timm.models.beit.Attention``                         :class:`vitkern.nn.BeitAttention`
``timm.models.maxxvit.AttentionCl``                    :class:`vitkern.nn.MaxxVitAttentionCl`
``timm.models.maxxvit.Attention2d``                    :class:`vitkern.nn.MaxxVitAttention2d`
``timm.models.vision_transformer.VisionTransformer``   :class:`vitkern.models.timm_vit.VisionTransformer`
``timm.models.deit.VisionTransformerDistilled``        :class:`vitkern.models.timm_vit.VisionTransformerDistilled`
=====================================================  =====================================

and ``timm.models.swin_transformer_v2.SwinTransformerV2Block`` by
:class:`vitkern.nn.SwinTransformerV2Block` (Swin V2: cosine attention, continuous position bias).

**The ViT embedding.** A timm ``VisionTransformer`` / ``VisionTransformerDistilled`` is converted
in place, after its modules (so its ``patch_embed`` is vitkern's by then): its class becomes the
vitkern subclass of the same name (the object, modules, parameters, attributes and hooks stay),
whose forward makes every token (patches, CLS / register / distillation tokens, position
embedding, ``no_embed_class`` and ``dynamic_img_size`` included) in one
:func:`vitkern.ops.patch_embed` call instead of timm's ``torch.cat`` and ``+ pos_embed``; see
:mod:`vitkern.models.timm_vit`. It stays on timm's embedding, reported as skipped with the
reason, when the patch module was not converted, normalises the patch tokens
(``embed_norm_layer``) or has hooks, when the model is a subclass or its methods were replaced on
the instance.

MaxxViT's partition blocks (``PartitionAttentionCl``, ``PartitionAttention2d``,
``ParallelPartitionAttention``) are containers: they are descended into, not reported. The
MaxxViT attention modules adopt timm's ``rel_pos`` module itself (``RelPosBias``,
``RelPosBiasTf`` or ``RelPosMlp``), whose ``get_bias()`` gives the op's ``attn_bias``.

This covers timm's ``VisionTransformer``, ``SwinTransformer``, ``PyramidVisionTransformerV2``,
``Beit`` and ``MaxxVit`` (CoAtNet, MaxViT) attention (and any other model built from these modules). Each replacement gets the timm module's
configuration (read off its attributes) and the given ``backend``.

**Parameter identity.** The replacement does not copy weights: it *adopts* the timm module's
submodules (``qkv``, ``proj``, norms, ``mlp``, dropouts, ...) and ``Parameter`` objects
(e.g. Swin's ``attn.relative_position_bias_table``) themselves. So ``state_dict`` keys and
values are unchanged, ``requires_grad``, per-submodule ``training`` flags, parametrisations and
hooks on those submodules survive, and an optimizer (and its state) built *before*
``optimize()`` keeps updating the model. Norm layers keep their class and ``eps`` (timm's
``LayerNorm`` with eps 1e-6 stays that), activations and MLPs stay timm's. Forward/backward
hooks and state-dict hooks registered on a replaced module itself are moved to its replacement
(the hook dictionaries are shared, so existing handles still remove them). The new module gets
the old one's ``training`` flag. Replacements are built on the meta device (no memory, no use
of torch's random number generator) and then take the timm module's tensors, so they live on
the timm module's device and dtype.

**Not converted, and reported** (left exactly as they are):

* subclasses of the classes above (they may override ``forward``: e.g. timm's ``AttentionRope``
  family, or a user's subclass), and instances whose configuration the drop-in cannot express
  (e.g. a patch ``proj`` that is not a plain stride == kernel ``Conv2d``, a PVT ``sr`` conv with
  padding, a Swin shift >= window); the reason is recorded;
* timm attention modules vitkern has no drop-in for (class name containing ``Attention``, e.g.
  ``DiffAttention``, ``AttentionRope``, ``AttentionPoolLatent``);
* other timm patch-embedding stems (``OverlapPatchEmbed`` of PVT v2, ``HybridEmbed``, ...) are
  listed under ``not_covered`` in the report (no warning: they are not attention).

Reporting: :func:`optimize` emits one :class:`OptimizeWarning` per call when something was
skipped (its message lists what was converted, what was skipped and why), or when nothing at
all was found to convert (e.g. timm not installed and a plain ``nn.Module``); otherwise it logs
the summary at INFO level on the ``vitkern.convert`` logger. ``verbose=True`` prints the summary
instead (once: the warning then only points at it, and nothing is logged). :func:`convert` does the same work and returns a :class:`ConversionReport` instead of
the model (``report.model`` is the model), without warning.

**vitkern's own models** (``vitkern.models.ViT`` and any module defined in vitkern) already run
vitkern ops and are left as they are. ``backend=None`` (the default) leaves their backends
alone and builds the replacements with ``"auto"``; an explicit ``backend`` is used for the
replacements *and* set on every vitkern module in the tree (including modules converted by an
earlier ``optimize`` call), so ``optimize(model, backend="torch")`` also switches an already
optimised model.

Notes:

* Call ``optimize`` before ``torch.compile`` (a compiled graph keeps the modules it traced).
* A model whose root module is itself replaceable (e.g. a lone timm ``Attention``) cannot be
  changed in place: the replacement is returned, so write ``model = vitkern.optimize(model)``.
* Training with attention dropout > 0: the fused ops (global and Swin window attention) draw
  their own random numbers in-kernel, so a training step equals timm's in distribution, not bit
  for bit.
* An explicit backend that cannot run a call (e.g. ``"triton"`` on CPU without
  ``TRITON_INTERPRET=1``) raises at forward time with the reason; ``"auto"`` always falls back.
* timm is only looked up in ``sys.modules``: a model can only hold timm modules if timm was
  imported, so ``vitkern.optimize`` never imports timm itself and works without it.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from vitkern._args import pair

__all__ = ["optimize", "convert", "ConversionReport", "OptimizeWarning"]

_log = logging.getLogger("vitkern.convert")

_HOOK_ATTRS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class OptimizeWarning(UserWarning):
    """:func:`vitkern.optimize` left modules unconverted (or found nothing to convert); the message says why."""


class _Unsupported(Exception):
    """This module's configuration has no exact vitkern equivalent (the message says why)."""


@dataclass
class ConversionReport:
    """What :func:`convert` / :func:`vitkern.optimize` did.

    * ``converted``:   (path, timm class, vitkern class) per replaced module;
    * ``skipped``:     (path, class, reason) per module of a supported family left as it was;
    * ``not_covered``: (path, class) per timm patch-embedding stem vitkern has no drop-in for;
    * ``backend_set``: paths of vitkern modules whose ``backend`` was set (explicit ``backend``);
    * ``vitkern_modules``: number of modules already from vitkern;
    * ``model``: the model (the replacement itself when the root module was replaced).
    """

    model: Optional[nn.Module] = None
    backend: Optional[str] = None
    converted: List[Tuple[str, str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)
    not_covered: List[Tuple[str, str]] = field(default_factory=list)
    backend_set: List[str] = field(default_factory=list)
    vitkern_modules: int = 0
    timm_note: str = ""

    def counts(self) -> Dict[str, int]:
        """{vitkern class name: number of modules converted to it}."""
        out: Dict[str, int] = {}
        for _, _, target in self.converted:
            out[target] = out.get(target, 0) + 1
        return out

    def summary(self) -> str:
        name = type(self.model).__name__ if self.model is not None else "model"
        backend = self.backend if self.backend is not None else "auto"
        lines = [f"vitkern.optimize({name}, backend={backend!r}):"]
        if self.converted:
            counts = ", ".join(f"{n} x{c}" for n, c in sorted(self.counts().items()))
            lines.append(f"  converted {len(self.converted)} module(s): {counts}")
            for path, src, dst in self.converted:
                lines.append(f"    {path or '<root>'}: {src} -> {dst}")
        else:
            lines.append("  converted nothing" + (f" ({self.timm_note})" if self.timm_note else ""))
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} module(s) (left as they are):")
            for path, cls, reason in self.skipped:
                lines.append(f"    {path or '<root>'}: {cls}: {reason}")
        if self.not_covered:
            lines.append("  no vitkern drop-in (left as they are): "
                         + ", ".join(f"{p} ({c})" for p, c in self.not_covered))
        if self.vitkern_modules:
            lines.append(f"  {self.vitkern_modules} module(s) already from vitkern"
                         + (f"; backend set to {self.backend!r} on {len(self.backend_set)}" if self.backend_set
                            else " (left as they are)"))
        return "\n".join(lines)

    __str__ = summary


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_vitkern(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "vitkern"


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "timm"


def _exact(module, cls, what: str) -> None:
    if type(module) is not cls:
        raise _Unsupported(f"{what} is {type(module).__name__ if module is not None else None}, "
                           f"expected a plain {cls.__module__}.{cls.__name__}")


def _plain_conv(conv, kernel: Tuple[int, int], what: str) -> None:
    """``conv`` is a plain nn.Conv2d with kernel == stride == ``kernel`` (what the fused ops compute)."""
    _exact(conv, nn.Conv2d, what)
    if (tuple(conv.kernel_size) != tuple(kernel) or tuple(conv.stride) != tuple(kernel)
            or tuple(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
            or (isinstance(conv.padding, str) and conv.padding != "valid")
            or (not isinstance(conv.padding, str) and tuple(conv.padding) != (0, 0))):
        raise _Unsupported(
            f"{what} must be Conv2d(kernel_size=stride={tuple(kernel)}, padding=0, dilation=1, groups=1), got "
            f"kernel_size={tuple(conv.kernel_size)}, stride={tuple(conv.stride)}, padding={conv.padding}, "
            f"dilation={tuple(conv.dilation)}, groups={conv.groups}, padding_mode={conv.padding_mode!r}")


def _graft(new: nn.Module, old: nn.Module, recurse: Dict[str, dict], path: str = "") -> None:
    """Make ``new`` use ``old``'s submodules, parameters and persistent buffers (the same objects).

    Children named in ``recurse`` stay ``new``'s own (vitkern) modules and are grafted recursively
    (``recurse[name]`` is their own recurse dict); every other child is ``old``'s child itself.
    Non-persistent buffers of ``new`` still on the meta device take ``old``'s buffer of the same
    name (same shape and dtype), else the conversion is refused.
    """
    where = f"{path}." if path else ""
    for name in set(new._modules) | set(old._modules):
        o = old._modules.get(name)
        if name in recurse:
            n = new._modules.get(name)
            if n is None or o is None:
                raise _Unsupported(f"{where}{name} is {o!r} in timm's module, expected a module")
            _graft(n, o, recurse[name], where + name)
            n.training = o.training
        elif name in old._modules:
            new._modules[name] = o
        else:  # a child timm's (older) module does not have: only harmless if it holds no state
            n = new._modules[name]
            if n is not None and (any(True for _ in n.parameters()) or any(True for _ in n.buffers())):
                raise _Unsupported(f"the vitkern module has a submodule {where}{name} timm's module lacks")
    for name in set(new._parameters) | set(old._parameters):
        if name not in old._parameters or name not in new._parameters:
            raise _Unsupported(f"parameter {where}{name} exists only in "
                               f"{'the vitkern' if name in new._parameters else 'the timm'} module")
        o = old._parameters[name]
        n = new._parameters[name]
        if (o is None) != (n is None) or (o is not None and o.shape != n.shape):
            raise _Unsupported(f"parameter {where}{name}: timm has "
                               f"{None if o is None else tuple(o.shape)}, vitkern expects "
                               f"{None if n is None else tuple(n.shape)}")
        new._parameters[name] = o
    for name, buf in new._buffers.items():
        o = old._buffers.get(name)
        persistent = name not in new._non_persistent_buffers_set
        if persistent:
            if name not in old._buffers or name in old._non_persistent_buffers_set:
                raise _Unsupported(f"persistent buffer {where}{name} is not a persistent buffer of timm's module")
            new._buffers[name] = o
        elif buf is not None and buf.device.type == "meta":
            if o is None or o.shape != buf.shape or o.dtype != buf.dtype:
                raise _Unsupported(f"buffer {where}{name} cannot be taken from timm's module")
            new._buffers[name] = o
    for name in old._buffers:
        if name not in old._non_persistent_buffers_set and name not in new._buffers:
            raise _Unsupported(f"timm's module has a persistent buffer {where}{name} the vitkern module lacks")


def _finish(new: nn.Module, old: nn.Module, recurse: Dict[str, dict]) -> nn.Module:
    """Graft, then check the state_dict is the very same, copy training mode and hooks."""
    _graft(new, old, recurse)
    old_sd = old.state_dict(keep_vars=True)
    new_sd = new.state_dict(keep_vars=True)
    if list(old_sd) != list(new_sd):
        raise _Unsupported(f"state_dict keys differ: timm {list(old_sd)} vs vitkern {list(new_sd)}")
    for k, v in old_sd.items():
        if new_sd[k] is not v:
            raise _Unsupported(f"state_dict entry {k} could not be shared")
    old_on_meta = any(t.device.type == "meta" for t in list(old.parameters()) + list(old.buffers()))
    if not old_on_meta:
        for name, t in list(new.named_parameters()) + list(new.named_buffers()):
            if t.device.type == "meta":
                raise _Unsupported(f"{name} has no tensor to take from timm's module")
    new.training = old.training
    for attr in _HOOK_ATTRS:
        value = getattr(old, attr, None)
        if value:
            setattr(new, attr, value)
    return new


# --------------------------------------------------------------------------- #
# converters: timm module -> vitkern module (or _Unsupported)
# --------------------------------------------------------------------------- #
def _convert_patch_embed(old, backend: str) -> nn.Module:
    from vitkern.nn import PatchEmbed

    patch = pair(old.patch_size)
    _plain_conv(old.proj, patch, "proj")
    fmt = getattr(old.output_fmt, "value", old.output_fmt)
    new = PatchEmbed(
        img_size=old.img_size,
        patch_size=patch,
        in_chans=old.proj.in_channels,
        embed_dim=old.proj.out_channels,
        norm_layer=None,
        flatten=bool(old.flatten),
        output_fmt=None if old.flatten else str(fmt),
        bias=old.proj.bias is not None,
        strict_img_size=bool(old.strict_img_size),
        dynamic_img_pad=bool(old.dynamic_img_pad),
        device="meta",
        backend=backend,
    )
    # the size bookkeeping exactly as timm's (set_input_size may have changed it after construction)
    new.img_size, new.grid_size, new.num_patches = old.img_size, old.grid_size, old.num_patches
    return _finish(new, old, {})


def _convert_attention(old, backend: str) -> nn.Module:
    from vitkern.nn import Attention

    _exact(old.qkv, nn.Linear, "qkv")
    qk_norm = not isinstance(old.q_norm, nn.Identity)
    if qk_norm == isinstance(old.k_norm, nn.Identity):
        raise _Unsupported("q_norm and k_norm must both be nn.Identity or both be norms")
    scale_norm = not isinstance(old.norm, nn.Identity)
    gate = getattr(old, "gate", None)
    new = Attention(
        old.qkv.in_features,
        num_heads=old.num_heads,
        attn_head_dim=old.head_dim,
        dim_out=old.proj.out_features,
        qkv_bias=old.qkv.bias is not None,
        qk_norm=qk_norm,
        scale_norm=scale_norm,
        proj_bias=old.proj.bias is not None,
        gated=gate is not None,
        attn_drop=old.attn_drop.p,
        proj_drop=old.proj_drop.p,
        norm_layer=nn.LayerNorm if (qk_norm or scale_norm) else None,  # placeholders: timm's norms are adopted
        device="meta",
        backend=backend,
    )
    if old.qkv.out_features != 3 * new.attn_dim:
        raise _Unsupported(f"qkv.out_features={old.qkv.out_features} != 3 * num_heads * head_dim = {3 * new.attn_dim}")
    new.scale = old.scale
    return _finish(new, old, {})


def _convert_swin_block(old, backend: str) -> nn.Module:
    from vitkern.nn import SwinTransformerBlock

    attn = old.attn
    _exact(attn.qkv, nn.Linear, "attn.qkv")
    _exact(attn.proj, nn.Linear, "attn.proj")
    num_heads = attn.num_heads
    if attn.qkv.out_features % (3 * num_heads):
        raise _Unsupported(f"attn.qkv.out_features={attn.qkv.out_features} is not a multiple of 3 * num_heads")
    head_dim = attn.qkv.out_features // (3 * num_heads)
    if tuple(pair(attn.window_size)) != tuple(pair(old.window_size)):
        raise _Unsupported(f"attn.window_size={attn.window_size} != block window_size={old.window_size}")
    try:
        new = SwinTransformerBlock(
            dim=old.dim,
            input_resolution=old.input_resolution,
            num_heads=num_heads,
            head_dim=head_dim,
            window_size=old.window_size,  # the effective window and shift (small-grid rule already applied)
            shift_size=old.shift_size,
            always_partition=old.always_partition,
            dynamic_mask=getattr(old, "dynamic_mask", False),
            mlp_ratio=old.mlp_ratio,
            qkv_bias=attn.qkv.bias is not None,
            device="meta",
            backend=backend,
        )
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None
    _copy_swin_windows(new, old)
    new.attn.scale = attn.scale
    return _finish(new, old, {"attn": {}})


def _copy_swin_windows(new, old) -> None:
    """timm's exact window bookkeeping (e.g. after set_input_size with another window), V1 and V2 blocks."""
    new.window_size = tuple(pair(old.window_size))
    new.shift_size = tuple(pair(old.shift_size))
    new.target_shift_size = tuple(pair(old.target_shift_size))
    new.window_area = new.window_size[0] * new.window_size[1]
    try:
        new._check_window_shift()
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None


def _convert_swinv2_block(old, backend: str) -> nn.Module:
    from vitkern.nn.window_attention_v2 import SwinTransformerV2Block, WindowAttention

    attn = old.attn
    _exact(attn.qkv, nn.Linear, "attn.qkv")
    _exact(attn.proj, nn.Linear, "attn.proj")
    if attn.qkv.bias is not None:
        raise _Unsupported("attn.qkv must have no bias (Swin V2's q/v biases are separate parameters)")
    if (attn.qkv.in_features, attn.qkv.out_features, attn.proj.in_features) != (old.dim, 3 * old.dim, old.dim):
        raise _Unsupported(f"attn.qkv must be Linear({old.dim}, {3 * old.dim}) and attn.proj take {old.dim} "
                           f"features, got qkv {attn.qkv.in_features} -> {attn.qkv.out_features}, proj "
                           f"{attn.proj.in_features} -> {attn.proj.out_features}")
    if tuple(pair(attn.window_size)) != tuple(pair(old.window_size)):
        raise _Unsupported(f"attn.window_size={attn.window_size} != block window_size={old.window_size}")
    try:
        new = SwinTransformerV2Block(
            dim=old.dim,
            input_resolution=old.input_resolution,
            num_heads=attn.num_heads,
            window_size=old.window_size,  # the effective window and shift (small-grid rule already applied)
            shift_size=old.shift_size,
            always_partition=old.always_partition,
            dynamic_mask=getattr(old, "dynamic_mask", False),
            mlp_ratio=old.mlp_ratio,
            qkv_bias=attn.q_bias is not None,
            pretrained_window_size=attn.pretrained_window_size,
            device="meta",
            dtype=attn.qkv.weight.dtype,  # the k_bias / coordinates buffers are taken from timm's: same dtype
            backend=backend,
        )
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None
    _copy_swin_windows(new, old)
    new.attn.qkv_bias_separate = bool(attn.qkv_bias_separate)
    layers = sys.modules.get("timm.layers")  # FX: keep the drop-ins as leaves, as register_fx_leaf_modules does
    if layers is not None and hasattr(layers, "register_notrace_module"):
        for cls in (SwinTransformerV2Block, WindowAttention):
            layers.register_notrace_module(cls)
    return _finish(new, old, {"attn": {}})


def _convert_pvt_attention(old, backend: str) -> nn.Module:
    from vitkern.nn import SRAttention

    for name in ("q", "kv", "proj"):
        _exact(getattr(old, name), nn.Linear, name)
    if (old.q.bias is None) != (old.kv.bias is None):
        raise _Unsupported("q and kv must both have a bias or both have none")
    linear_attn = old.pool is not None
    if linear_attn:
        pool = old.pool
        _exact(pool, nn.AdaptiveAvgPool2d, "pool")
        if pair(pool.output_size) != (7, 7):
            raise _Unsupported(f"pool.output_size must be 7, got {pool.output_size}")
        _exact(old.act, nn.GELU, "act")
        if old.act.approximate != "none":
            raise _Unsupported(f"act must be the exact GELU, got approximate={old.act.approximate!r}")
        _plain_conv(old.sr, (1, 1), "sr")
        sr_ratio = 1
    elif old.sr is not None:
        k = pair(old.sr.kernel_size)
        if k[0] != k[1]:
            raise _Unsupported(f"sr.kernel_size must be square, got {k}")
        sr_ratio = k[0]
        _plain_conv(old.sr, k, "sr")
    else:
        sr_ratio = 1
    if old.sr is not None:
        _exact(old.norm, nn.LayerNorm, "norm")
        if tuple(old.norm.normalized_shape) != (old.dim,) or old.norm.weight is None or old.norm.bias is None:
            raise _Unsupported("norm must be LayerNorm(dim) with weight and bias")
    new = SRAttention(
        old.dim,
        num_heads=old.num_heads,
        sr_ratio=sr_ratio,
        linear_attn=linear_attn,
        qkv_bias=old.q.bias is not None,
        attn_drop=old.attn_drop.p,
        proj_drop=old.proj_drop.p,
        device="meta",
        backend=backend,
    )
    new.scale = old.scale
    return _finish(new, old, {})


def _convert_beit_attention(old, backend: str) -> nn.Module:
    from vitkern.nn import BeitAttention

    _exact(old.qkv, nn.Linear, "qkv")
    _exact(old.proj, nn.Linear, "proj")
    if old.qkv.bias is not None:
        raise _Unsupported("qkv must have no bias (BEiT's q/v biases are separate parameters)")
    num_heads = old.num_heads
    if old.qkv.out_features % (3 * num_heads):
        raise _Unsupported(f"qkv.out_features={old.qkv.out_features} is not a multiple of 3 * num_heads")
    new = BeitAttention(
        old.qkv.in_features,
        num_heads=num_heads,
        qkv_bias=old.q_bias is not None,
        qkv_bias_separate=bool(old.qkv_bias_separate),
        attn_drop=old.attn_drop.p,
        proj_drop=old.proj_drop.p,
        window_size=tuple(old.window_size) if old.window_size is not None else None,
        attn_head_dim=old.qkv.out_features // (3 * num_heads),
        device="meta",
        dtype=old.qkv.weight.dtype,  # the k_bias buffer is taken from timm's module: same dtype
        backend=backend,
    )
    new.scale = old.scale
    return _finish(new, old, {})


def _convert_maxxvit_attention(old, backend: str, two_d: bool) -> nn.Module:
    from vitkern.nn import MaxxVitAttention2d, MaxxVitAttentionCl

    if two_d:
        _plain_conv(old.qkv, (1, 1), "qkv")
        _plain_conv(old.proj, (1, 1), "proj")
        dim, dim_attn3, dim_out = old.qkv.in_channels, old.qkv.out_channels, old.proj.out_channels
    else:
        _exact(old.qkv, nn.Linear, "qkv")
        _exact(old.proj, nn.Linear, "proj")
        dim, dim_attn3, dim_out = old.qkv.in_features, old.qkv.out_features, old.proj.out_features
    rel_pos = old.rel_pos
    if rel_pos is not None and not callable(getattr(rel_pos, "get_bias", None)):
        raise _Unsupported(f"rel_pos ({type(rel_pos).__name__}) has no get_bias()")
    dim_attn = dim_attn3 // 3
    cls = MaxxVitAttention2d if two_d else MaxxVitAttentionCl
    new = cls(
        dim,
        dim_out,
        dim_head=old.dim_head,
        bias=old.qkv.bias is not None,
        expand_first=dim_attn != dim,  # timm's attention width is dim_out when expanding first, else dim
        head_first=bool(old.head_first),
        # a placeholder child, so that grafting puts timm's rel_pos module itself in its place
        rel_pos_cls=(lambda **_: nn.Identity()) if rel_pos is not None else None,
        attn_drop=old.attn_drop.p,
        proj_drop=old.proj_drop.p,
        device="meta",
        backend=backend,
    )
    if (new.num_heads, 3 * new.num_heads * new.dim_head) != (old.num_heads, dim_attn3):
        raise _Unsupported(f"num_heads={old.num_heads}, dim_head={old.dim_head} and qkv width {dim_attn3} "
                           f"do not match a timm configuration")
    if (old.proj.bias is None) != (old.qkv.bias is None):
        raise _Unsupported("qkv and proj must both have a bias or both have none")
    new.scale = old.scale
    return _finish(new, old, {})


def _convert_vit_embedding(model, backend: str) -> str:
    """Give a timm ViT / DeiT-distilled the fused embedding in place (its class is swapped); returns the new
    class's name. Its modules must have been converted already (it reads vitkern's ``patch_embed``)."""
    import inspect

    from vitkern.models import timm_vit
    from vitkern.nn import PatchEmbed
    from vitkern.nn.patch_embed import Format
    from vitkern.ops.patch_embed import MAX_PREFIX_TOKENS

    target = timm_vit.CONVERTED[type(model)]
    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise _Unsupported(f"patch_embed is {_qualname(type(pe))}, not vitkern.nn.PatchEmbed (it was not converted)")
    if not isinstance(pe.norm, nn.Identity):
        raise _Unsupported(f"patch_embed.norm is {type(pe.norm).__name__}: timm normalises the patch tokens before "
                           f"the position embedding is added, which the fused op does not do")
    if model.dynamic_img_size:
        if pe.flatten or pe.output_fmt != Format.NHWC:
            raise _Unsupported(f"dynamic_img_size needs patch_embed.output_fmt NHWC (timm's setting), got "
                               f"flatten={pe.flatten}, output_fmt={pe.output_fmt.value}")
    elif not pe.flatten:
        raise _Unsupported(f"patch_embed must flatten to (B, N, D) tokens, got output_fmt={pe.output_fmt.value}")
    if pe._forward_hooks or pe._forward_pre_hooks or pe._backward_hooks or pe._backward_pre_hooks:
        raise _Unsupported("patch_embed has hooks, which the fused embedding (not calling it) would not run")
    for name in ("forward_features", "forward_intermediates", "_pos_embed", "_fused_tokens"):
        if name in model.__dict__:
            raise _Unsupported(f"{name} was replaced on the instance")
    # the converted forward_features stands in for timm's: it must be the method it was written against
    params = list(inspect.signature(type(model).forward_features).parameters)
    if params != ["self", "x", "attn_mask", "is_causal"]:
        raise _Unsupported(f"this timm version's forward_features{tuple(params[1:])} differs from "
                           f"(x, attn_mask, is_causal), which vitkern's fused embedding reproduces")
    dim = pe.proj.out_channels
    prefix = 0
    for t in target._prefix_tokens(model):  # the token parameters the converted class writes, in timm's order
        if t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != dim:
            raise _Unsupported(f"prefix token parameters must have shape (1, k, {dim}), got {tuple(t.shape)}")
        prefix += t.shape[1]
    if prefix != model.num_prefix_tokens:
        raise _Unsupported(f"num_prefix_tokens={model.num_prefix_tokens} but the token parameters hold {prefix} rows")
    if prefix > MAX_PREFIX_TOKENS:
        raise _Unsupported(f"{prefix} prefix tokens; the fused op writes at most {MAX_PREFIX_TOKENS}")
    pos = model.pos_embed
    if pos is not None and (pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != dim):
        raise _Unsupported(f"pos_embed must have shape (1, L, {dim}), got {tuple(pos.shape)}")
    model.__class__ = target
    model.backend = backend
    return _qualname(target)


def _timm_models() -> Tuple[type, ...]:
    """timm model classes whose embedding vitkern fuses (converted in place), when timm is imported."""
    if "timm.models.vision_transformer" not in sys.modules:
        return ()
    from vitkern.models import timm_vit
    return tuple(timm_vit.CONVERTED)


def _timm_converters() -> Tuple[Dict[type, Tuple[str, Callable]], Tuple[type, ...]]:
    """{timm class: (vitkern class name, converter)} for the timm modules already imported.

    timm is looked up in ``sys.modules`` only: a model cannot hold a timm module unless timm was imported.
    """
    table: Dict[type, Tuple[str, Callable]] = {}
    families: List[type] = []

    def add(module_name, attr, target, fn):
        mod = sys.modules.get(module_name)
        cls = getattr(mod, attr, None) if mod is not None else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            table[cls] = (target, fn)
            families.append(cls)

    add("timm.layers.patch_embed", "PatchEmbed", "PatchEmbed", _convert_patch_embed)
    add("timm.layers.attention", "Attention", "Attention", _convert_attention)
    add("timm.models.vision_transformer", "Attention", "Attention", _convert_attention)  # the same class today
    add("timm.models.swin_transformer", "SwinTransformerBlock", "SwinTransformerBlock", _convert_swin_block)
    add("timm.models.swin_transformer_v2", "SwinTransformerV2Block", "SwinTransformerV2Block", _convert_swinv2_block)
    add("timm.models.pvt_v2", "Attention", "SRAttention", _convert_pvt_attention)
    add("timm.models.beit", "Attention", "BeitAttention", _convert_beit_attention)
    add("timm.models.maxxvit", "AttentionCl", "MaxxVitAttentionCl",
        lambda old, backend: _convert_maxxvit_attention(old, backend, two_d=False))
    add("timm.models.maxxvit", "Attention2d", "MaxxVitAttention2d",
        lambda old, backend: _convert_maxxvit_attention(old, backend, two_d=True))
    return table, tuple(families)


def _timm_containers() -> Tuple[type, ...]:
    """timm modules named like attention that only hold attention modules: descended into, not reported."""
    mod = sys.modules.get("timm.models.maxxvit")
    names = ("PartitionAttentionCl", "PartitionAttention2d", "ParallelPartitionAttention")
    return tuple(c for c in (getattr(mod, n, None) for n in names) if isinstance(c, type)) if mod else ()


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def register_fx_leaf_modules() -> bool:
    """Register vitkern's drop-in modules with timm's list of modules FX must not trace into
    (``timm.layers.register_notrace_module``), as timm registers its own: timm's FX feature
    extraction (``create_feature_extractor``, ``features_only``) then keeps each as one call.
    Does nothing (returns False) when timm has not been imported."""
    layers = sys.modules.get("timm.layers")
    if layers is None or not hasattr(layers, "register_notrace_module"):
        return False
    from vitkern import nn as vnn
    from vitkern.nn.window_attention import WindowAttention
    for cls in (vnn.PatchEmbed, vnn.Attention, vnn.SwinTransformerBlock, WindowAttention, vnn.SRAttention,
                *(getattr(vnn, name) for name in ("BeitAttention", "MaxxVitAttentionCl", "MaxxVitAttention2d")
                  if hasattr(vnn, name))):
        layers.register_notrace_module(cls)
    return True


def convert(model: nn.Module, *, backend: Optional[str] = None) -> ConversionReport:
    """Replace supported timm modules in ``model`` in place; return a :class:`ConversionReport`.

    Same work as :func:`optimize` (see the module docstring), without warning or logging.
    """
    from vitkern import backends as _backends

    if not isinstance(model, nn.Module):
        raise TypeError(f"vitkern.optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        _backends.check_name(backend, "vitkern.optimize")
    new_backend = backend if backend is not None else "auto"
    register_fx_leaf_modules()
    report = ConversionReport(model=model, backend=backend)
    table, families = _timm_converters()
    containers = _timm_containers()
    if not table:
        installed = importlib.util.find_spec("timm") is not None
        report.timm_note = ("timm is installed but was not imported, so the model holds no timm modules"
                            if installed else "timm is not installed, so the model holds no timm modules")
    else:
        report.timm_note = ("no timm PatchEmbed, Attention, SwinTransformerBlock, SwinTransformerV2Block, "
                            "pvt_v2.Attention, beit.Attention, maxxvit AttentionCl / Attention2d or "
                            "VisionTransformer in the model")
    models = _timm_models()
    memo: Dict[int, nn.Module] = {}

    def convert_model(module: nn.Module, path: str) -> None:
        """A timm ViT: its modules first, then the fused embedding (in place), or the reason it stays timm's."""
        cls = type(module)
        visit(module, f"{path}." if path else "")
        if cls not in models:
            base = next(m for m in models if isinstance(module, m))
            report.skipped.append((path, _qualname(cls), f"embedding left on timm's path: subclass of "
                                   f"{_qualname(base)} (it may change the embedding); only the exact class is "
                                   f"converted"))
            return
        try:
            target = _convert_vit_embedding(module, new_backend)
        except (_Unsupported, ValueError, TypeError, AttributeError) as exc:
            report.skipped.append((path, _qualname(cls), f"embedding left on timm's path: {exc}"))
            return
        report.converted.append((path, _qualname(cls), target))

    def try_convert(module: nn.Module, path: str) -> Optional[nn.Module]:
        """The replacement for ``module``, or None (recorded as skipped/not covered when relevant)."""
        cls = type(module)
        if models and isinstance(module, models):
            convert_model(module, path)
            return module  # converted in place (its modules too)
        entry = table.get(cls)
        if entry is not None:
            target, fn = entry
            try:
                new = fn(module, new_backend)
            except (_Unsupported, ValueError, TypeError, AttributeError) as exc:
                report.skipped.append((path, _qualname(cls), f"unsupported configuration: {exc}"))
                return module  # handled (not descended into)
            report.converted.append((path, _qualname(cls), f"vitkern.nn.{target}"))
            return new
        base = next((f for f in families if isinstance(module, f)), None)
        if base is not None:
            report.skipped.append((path, _qualname(cls),
                                   f"subclass of {_qualname(base)} (it may change forward); only the exact class "
                                   f"is converted"))
            return module
        if _is_timm(module) and "Attention" in cls.__name__ and cls not in containers:
            report.skipped.append((path, _qualname(cls), "no vitkern drop-in for this attention module"))
            return module
        if _is_timm(module) and "Embed" in cls.__name__:
            report.not_covered.append((path, _qualname(cls)))
        return None

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}{name}"
            if id(child) in memo:  # shared module: converted once, the same replacement everywhere
                parent._modules[name] = memo[id(child)]
                continue
            if _is_vitkern(child):
                visit_vitkern(child, path)
                memo[id(child)] = child
                continue
            result = try_convert(child, path)
            if result is None:
                memo[id(child)] = child
                visit(child, path + ".")
            else:
                memo[id(child)] = result
                parent._modules[name] = result

    def visit_vitkern(module: nn.Module, path: str) -> None:
        report.vitkern_modules += 1
        if backend is not None and isinstance(getattr(module, "backend", None), str):
            module.backend = backend
            report.backend_set.append(path or "<root>")
        visit(module, f"{path}." if path else "")

    if _is_vitkern(model):
        visit_vitkern(model, "")
    else:
        result = try_convert(model, "")
        if result is None:
            visit(model, "")
        elif result is not model:
            report.model = result
    return report


def optimize(model: nn.Module, *, backend: Optional[str] = None, verbose: bool = False) -> nn.Module:
    """Swap vitkern's fused drop-in modules into a timm model, in place; return the model.

    Args:
        model: a ``torch.nn.Module`` (timm ``VisionTransformer``, ``SwinTransformer``,
            ``PyramidVisionTransformerV2``, any model built from their modules, or a vitkern model).
        backend: ``None`` (default: replacements use ``"auto"``, existing vitkern modules keep their
            backend) or ``"auto" | "cuda" | "triton" | "torch"`` (used for the replacements and set on
            every vitkern module in the model).
        verbose: also print the summary of what was converted / skipped.

    Returns:
        ``model`` (converted in place), or the replacement when ``model`` itself was a replaceable
        module. State_dict keys and tensors are unchanged (the same ``Parameter`` objects), so
        optimizers built before the call keep working.

    Warns:
        :class:`OptimizeWarning` once per call when modules were skipped (listing what was
        converted, what was skipped and why) or when nothing was found to convert.
    """
    report = convert(model, backend=backend)
    text = report.summary()
    nothing = not report.converted and not report.vitkern_modules
    if verbose:
        # The summary is shown once: printed here, so the warning only points at it and nothing is logged.
        print(text)
        if report.skipped or nothing:
            what = "converted nothing" if nothing else f"skipped {len(report.skipped)} module(s)"
            warnings.warn(f"vitkern.optimize {what}; see the summary printed above", OptimizeWarning, stacklevel=2)
    elif report.skipped or nothing:
        warnings.warn(text, OptimizeWarning, stacklevel=2)
    else:
        _log.info("%s", text)
    return report.model
