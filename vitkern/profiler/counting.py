"""Analytic cost of a config, counted (not guessed) by ``torch.utils.flop_counter``.

The model runs once on the meta device (timm and torchvision models) or under
``FakeTensorMode`` (vitkern's own models: their ops look up the autocast state of the
tensors' device type, which the meta device has none of). Either way no memory is
allocated and nothing is computed, so even ViT-H at 512 costs a fraction of a second.
The unfused ("naive") attention path is used, so every matmul is visible.

What is counted, per image (batch 1):

* FLOPs of the whole model (``FlopCounterMode``: 2 FLOPs per multiply-accumulate of every
  matmul / conv, including vitkern's custom ops through their registered formulas);
* split by the module the FLOPs happen in: **attention core** = the q·kᵀ and p·v
  batched matmuls (or an SDPA / vitkern attention op) inside attention modules - the
  term quadratic in tokens; **attention projections** = everything else inside attention
  modules (qkv, proj, PVT's spatial-reduction conv and kv); **MLP**; **other** (patch
  embedding, patch merging, head, ...);
* the attention-score tensors the naive path materialises: every softmax output is
  recorded with its shape, i.e. one (windows x) heads x Nq x Nk matrix per attention layer.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitkern.profiler.specs import Built, Config, build

__all__ = ["Counts", "count_config", "count_model", "SoftmaxRecorder", "classify_flops", "flop_counter"]

_SOFTMAX_OPS = {"aten._softmax.default", "aten._safe_softmax.default", "aten.softmax.int"}


class SoftmaxRecorder(TorchDispatchMode):
    """Records the shape of every softmax output (the naive path's attention probabilities)."""

    def __init__(self):
        super().__init__()
        self.shapes: List[Tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in _SOFTMAX_OPS and isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Convolution backward: each requested gradient (input, weight) costs what the forward costs.

    torch's own formula counts the weight gradient of a grouped convolution as if it were dense
    (``groups`` times too many: x channels for PVTv2's depthwise 3x3 convs); this one is exact for
    any groups.
    """
    from torch.utils.flop_counter import conv_flop_count
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter():
    """``FlopCounterMode`` with the grouped-convolution backward fixed (see :func:`_conv_backward_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


def _is_attention(module: torch.nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _is_mlp(module: torch.nn.Module) -> bool:
    return "mlp" in type(module).__name__.lower()


def _is_core_op(op_name: str) -> bool:
    """Ops computing q·kᵀ / p·v (and fused attention ops) rather than projections."""
    op = op_name.lower()
    return op.endswith(".bmm") or op.endswith(".baddbmm") or "scaled_dot_product" in op or \
        ("vitkern." in op and "attention" in op) or "flash_attention" in op or "efficient_attention" in op


def classify_flops(model: torch.nn.Module, flop_counts: Dict[str, Dict[object, int]]) -> Dict[str, int]:
    """Split ``FlopCounterMode.get_flop_counts()`` into attention core / projections / MLP.

    Keys of ``flop_counts`` are module paths prefixed by the root class name
    (``VisionTransformer.blocks.0.attn``); each module's count includes its children, so only
    the outermost attention and MLP modules are summed.
    """
    root = type(model).__name__
    attn_paths, mlp_paths = [], []
    claimed: List[str] = []
    for name, mod in model.named_modules():
        if not name or any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        if _is_attention(mod):
            attn_paths.append(f"{root}.{name}")
            claimed.append(name)
        elif _is_mlp(mod):
            mlp_paths.append(f"{root}.{name}")
            claimed.append(name)
    core = proj = mlp = 0
    for path in attn_paths:
        for op, n in flop_counts.get(path, {}).items():
            if _is_core_op(str(op)):
                core += n
            else:
                proj += n
    for path in mlp_paths:
        mlp += sum(flop_counts.get(path, {}).values())
    return {"attn_core": int(core), "attn_proj": int(proj), "mlp": int(mlp)}


@dataclass
class Counts:
    """Analytic cost of one config, per image. FLOPs = 2 x multiply-accumulates."""

    flops: int                      # forward, whole model
    attn_core_flops: int            # q·kᵀ and p·v (quadratic in tokens)
    attn_proj_flops: int            # qkv / proj / SR linears inside attention modules
    mlp_flops: int
    other_flops: int
    params: int
    tokens: int                     # patch tokens of the first stage
    prefix_tokens: int              # CLS etc.
    score_shapes: List[Tuple[int, ...]] = field(default_factory=list)  # per attention layer, batch 1
    train_flops: Optional[int] = None           # forward + backward, whole model
    train_attn_core_flops: Optional[int] = None
    train_mlp_flops: Optional[int] = None

    @property
    def macs(self) -> int:
        return self.flops // 2

    @property
    def attn_flops(self) -> int:
        return self.attn_core_flops + self.attn_proj_flops

    @property
    def score_elems_per_layer(self) -> List[int]:
        return [math.prod(s) for s in self.score_shapes]

    @property
    def keys_per_query(self) -> int:
        return self.score_shapes[0][-1] if self.score_shapes else 0

    @property
    def seq_len(self) -> int:
        return self.tokens + self.prefix_tokens

    def score_bytes(self, dtype: torch.dtype, batch: int = 1) -> Tuple[int, int]:
        """(largest layer, all layers) bytes of the naive path's attention-score matrices."""
        size = torch.empty((), dtype=dtype, device="meta").element_size()
        per = self.score_elems_per_layer
        return (max(per) * size * batch if per else 0), sum(per) * size * batch

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score_shapes"] = [list(s) for s in self.score_shapes]
        return d


@contextlib.contextmanager
def _counting_model(config: Config):
    """Yield (Built, input) allocated nowhere: meta device, or FakeTensorMode for vitkern's models.

    Always float32: FLOPs do not depend on the dtype (:meth:`Counts.score_bytes` takes the dtype)."""
    dtype = torch.float32
    from vitkern.profiler.specs import has_timm
    vitkern_impl = config.spec.family == "d2l" or (config.spec.family == "vit" and not has_timm())
    if vitkern_impl:
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            built = build(config, "cpu", dtype)
            yield built, torch.empty(1, built.in_chans, config.resolution, config.resolution, dtype=dtype)
    else:
        built = build(config, "meta", dtype)
        yield built, torch.empty(1, built.in_chans, config.resolution, config.resolution, dtype=dtype,
                                 device="meta")


def _run_counted(built: Built, x: torch.Tensor, backward: bool):
    if built.impl in ("vitkern", "torchvision"):
        fn = built.model  # vitkern on fake CPU tensors: its ops pick the naive reference, modules stay visible
    else:
        fn = built.prepare("naive", torch.device("meta"))
    counter, recorder = flop_counter(), SoftmaxRecorder()
    if backward:
        built.model.train()
        with counter, recorder:
            out = fn(x)
            out.backward(torch.empty_like(out))
    else:
        built.model.eval()
        with counter, recorder, torch.no_grad():
            fn(x)
    return counter, recorder


def count_config(config: Config, *, backward: bool = False) -> Counts:
    """Count one config (batch 1). With ``backward`` also the forward + backward FLOPs."""
    with _counting_model(config) as (built, x):
        counter, recorder = _run_counted(built, x, backward=False)
        split = classify_flops(built.model, counter.get_flop_counts())
        total = int(counter.get_total_flops())
        tokens, prefix = built.tokens()
        counts = Counts(
            flops=total, attn_core_flops=split["attn_core"], attn_proj_flops=split["attn_proj"],
            mlp_flops=split["mlp"], other_flops=total - split["attn_core"] - split["attn_proj"] - split["mlp"],
            params=sum(p.numel() for p in built.model.parameters()), tokens=tokens, prefix_tokens=prefix,
            score_shapes=list(recorder.shapes),
        )
        if backward:
            counter, _ = _run_counted(built, x, backward=True)
            split = classify_flops(built.model, counter.get_flop_counts())
            counts.train_flops = int(counter.get_total_flops())
            counts.train_attn_core_flops = split["attn_core"]
            counts.train_mlp_flops = split["mlp"]
    return counts


def count_model(model: str, resolution: int, patch: Optional[int] = None, *, backward: bool = False) -> Counts:
    """Convenience: ``count_model("vit-b", 224).macs`` -> 17.56e9 (ViT-B/16 at 224)."""
    from vitkern.profiler.specs import parse_model
    spec, override = parse_model(model)
    patch = patch or override or (spec.patch if spec.has_patch else None)
    return count_config(Config(spec, resolution, patch), backward=backward)
