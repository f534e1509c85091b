"""Model configurations the profiler knows, and how to build each one.

A *model spec* names an architecture (ViT-Ti/S/B/L/H, a custom ViT, the d2l seed ViT,
Swin-T/S/B, PVTv2-b0..b5, ResNet-50); a *config* is a spec at one resolution (and, for
ViTs, one patch size). :func:`build` instantiates a config on a device:

* ViTs are timm ``VisionTransformer`` (``pretrained=False``: nothing is downloaded) when
  timm is importable, else :class:`vitkern.models.ViT` with the same dimensions;
* the d2l seed ViT is always :class:`vitkern.models.ViT`;
* Swin and PVT v2 need timm (without it they are skipped with a message);
* ResNet-50 comes from torchvision and is only counted (FLOPs), never timed.

A built model exposes one callable per backend (``naive``, ``sdpa``, ``vitkern``) or the
reason that backend cannot run it (see :meth:`Built.prepare`).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

__all__ = [
    "ModelSpec", "Config", "ModelUnavailable", "parse_model", "known_models", "default_models",
    "default_resolutions", "check_resolution", "build", "Built", "has_timm", "has_torchvision",
    "BACKENDS", "D2L_CHAPTER",
]

BACKENDS = ("naive", "sdpa", "vitkern")

# d2l chapter 11.8's hyper-parameters (the seed ViT trained on Fashion-MNIST).
D2L_CHAPTER = dict(patch_size=16, num_hiddens=512, mlp_num_hiddens=2048, num_heads=8, num_blks=2,
                   emb_dropout=0.1, blk_dropout=0.1, lr=0.1, in_chans=1, num_classes=10)


class ModelUnavailable(RuntimeError):
    """This model cannot be built here (missing optional package); the message says why."""


def has_timm() -> bool:
    return _importable("timm")


def has_torchvision() -> bool:
    return _importable("torchvision")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


@dataclass(frozen=True)
class ModelSpec:
    key: str                 # canonical name: "vit-b", "swin-t", "pvtv2-b2", "resnet50", "d2l-vit", "vit:dim=..."
    label: str               # display name: "ViT-B", "Swin-T", ...
    family: str              # "vit" | "d2l" | "swin" | "pvt" | "cnn"
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    mlp_dim: int = 0
    patch: int = 0           # default patch size (ViT families)
    timm_name: str = ""      # swin / pvt

    @property
    def has_patch(self) -> bool:
        return self.family in ("vit", "d2l")

    @property
    def measurable(self) -> bool:
        return self.family != "cnn"


@dataclass(frozen=True)
class Config:
    spec: ModelSpec
    resolution: int
    patch: Optional[int] = None

    @property
    def name(self) -> str:
        """Series name (model + patch), e.g. ``ViT-B/16``; the resolution is separate."""
        return f"{self.spec.label}/{self.patch}" if self.spec.has_patch else self.spec.label


_VIT = {  # key: (label, embed_dim, depth, heads, default patch); MLP = 4 * embed_dim (timm's mlp_ratio 4)
    "vit-ti": ("ViT-Ti", 192, 12, 3, 16),
    "vit-s": ("ViT-S", 384, 12, 6, 16),
    "vit-b": ("ViT-B", 768, 12, 12, 16),
    "vit-l": ("ViT-L", 1024, 24, 16, 16),
    "vit-h": ("ViT-H", 1280, 32, 16, 14),
}
_SWIN = {
    "swin-t": ("Swin-T", "swin_tiny_patch4_window7_224"),
    "swin-s": ("Swin-S", "swin_small_patch4_window7_224"),
    "swin-b": ("Swin-B", "swin_base_patch4_window7_224"),
}
_PVT = {f"pvtv2-b{i}": (f"PVTv2-b{i}", f"pvt_v2_b{i}") for i in range(6)}


def _registry() -> Dict[str, ModelSpec]:
    specs = {}
    for key, (label, dim, depth, heads, patch) in _VIT.items():
        specs[key] = ModelSpec(key, label, "vit", dim, depth, heads, 4 * dim, patch)
    for key, (label, name) in _SWIN.items():
        specs[key] = ModelSpec(key, label, "swin", timm_name=name)
    for key, (label, name) in _PVT.items():
        specs[key] = ModelSpec(key, label, "pvt", timm_name=name)
    c = D2L_CHAPTER
    specs["d2l-vit"] = ModelSpec("d2l-vit", "d2l-ViT", "d2l", c["num_hiddens"], c["num_blks"], c["num_heads"],
                                 c["mlp_num_hiddens"], c["patch_size"])
    specs["resnet50"] = ModelSpec("resnet50", "ResNet-50", "cnn")
    return specs


_SPECS = _registry()
_CUSTOM_RE = re.compile(r"^vit:(.+)$")
_CUSTOM_KEYS = {"dim", "depth", "heads", "mlp", "patch"}


def known_models() -> List[str]:
    """Names accepted by ``--models`` (plus ``vit:dim=D,depth=L,heads=H[,mlp=M][,patch=P]``)."""
    return list(_SPECS)


def _canonical(text: str) -> str:
    return re.sub(r"[\s_\-]", "", text.lower())


_ALIASES = {_canonical(k): k for k in _SPECS}
_ALIASES.update({"vittiny": "vit-ti", "vitsmall": "vit-s", "vitbase": "vit-b", "vitlarge": "vit-l",
                 "vithuge": "vit-h", "swintiny": "swin-t", "swinsmall": "swin-s", "swinbase": "swin-b",
                 "d2l": "d2l-vit", "seedvit": "d2l-vit", "resnet": "resnet50"})
_ALIASES.update({_canonical(f"pvt_v2_b{i}"): f"pvtv2-b{i}" for i in range(6)})


def parse_model(text: str) -> Tuple[ModelSpec, Optional[int]]:
    """``"vit-b"``, ``"ViT-B/32"``, ``"swin-t"``, ``"pvt_v2_b2"``, ``"vit:dim=64,depth=2,heads=2"`` ...

    Returns (spec, patch override or None). Raises ``ValueError`` with the known names.
    """
    raw = text.strip()
    m = _CUSTOM_RE.match(raw.lower())
    if m:
        return _parse_custom(raw, m.group(1))
    name, patch = raw, None
    if "/" in raw:
        name, _, p = raw.partition("/")
        if not p.isdigit() or int(p) <= 0:
            raise ValueError(f"model {text!r}: the part after '/' must be a positive patch size, e.g. vit-b/16")
        patch = int(p)
    key = _ALIASES.get(_canonical(name))
    if key is None:
        raise ValueError(f"unknown model {text!r}; known models: {', '.join(known_models())}, "
                         f"or a custom ViT as vit:dim=D,depth=L,heads=H[,mlp=M][,patch=P]")
    spec = _SPECS[key]
    if patch is not None and not spec.has_patch:
        raise ValueError(f"model {text!r}: a patch size ('/{patch}') only applies to ViT models")
    return spec, patch


def _parse_custom(raw: str, body: str) -> Tuple[ModelSpec, Optional[int]]:
    values = {}
    for item in body.split(","):
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or k not in _CUSTOM_KEYS:
            raise ValueError(f"custom model {raw!r}: expected comma-separated key=value pairs with keys "
                             f"{sorted(_CUSTOM_KEYS)}, got {item!r}")
        try:
            values[k] = int(v)
        except ValueError:
            raise ValueError(f"custom model {raw!r}: {k} must be an integer, got {v!r}") from None
        if values[k] <= 0:
            raise ValueError(f"custom model {raw!r}: {k} must be positive, got {values[k]}")
    missing = {"dim", "depth", "heads"} - set(values)
    if missing:
        raise ValueError(f"custom model {raw!r}: missing {', '.join(sorted(missing))} "
                         f"(format vit:dim=D,depth=L,heads=H[,mlp=M][,patch=P])")
    dim, depth, heads = values["dim"], values["depth"], values["heads"]
    if dim % heads:
        raise ValueError(f"custom model {raw!r}: dim={dim} must be divisible by heads={heads}")
    mlp = values.get("mlp", 4 * dim)
    patch = values.get("patch", 16)
    label = f"ViT(d={dim},L={depth},h={heads}" + (f",mlp={mlp}" if mlp != 4 * dim else "") + ")"
    key = f"vit:dim={dim},depth={depth},heads={heads},mlp={mlp},patch={patch}"
    return ModelSpec(key, label, "vit", dim, depth, heads, mlp, patch), None


def default_models() -> List[str]:
    """The no-argument run: ViT-B/16, ViT-B/32, Swin-T, PVTv2-b2 (+ ResNet-50 FLOPs when torchvision is here)."""
    models = ["vit-b/16", "vit-b/32", "swin-t", "pvtv2-b2"]
    if has_torchvision():
        models.append("resnet50")
    return models


def default_resolutions(spec: ModelSpec, patch: Optional[int] = None) -> List[int]:
    """ViTs and ResNet-50: 224, 384, 512 (the seed's grid; for a patch that does not divide them, the
    nearest multiples, e.g. 224, 378, 518 for ViT-H/14); Swin and PVT: 224, 512."""
    if spec.family in ("swin", "pvt"):
        return [224, 512]
    if spec.has_patch and patch:
        return sorted({max(patch, round(r / patch) * patch) for r in (224, 384, 512)})
    return [224, 384, 512]


def check_resolution(spec: ModelSpec, resolution: int, patch: Optional[int]) -> Optional[str]:
    """None if the config is valid, else why not."""
    if resolution <= 0:
        return f"resolution must be positive, got {resolution}"
    if spec.has_patch and resolution % patch:
        return f"{spec.label}: resolution {resolution} is not divisible by the patch size {patch}"
    if spec.family in ("swin", "pvt") and resolution % 32:
        return (f"{spec.label}: resolution {resolution} must be a multiple of 32 "
                f"(patch 4, then three 2x downsamplings)")
    return None


# --------------------------------------------------------------------------- #
# Building
# --------------------------------------------------------------------------- #
@dataclass
class Built:
    """A config instantiated on a device. ``impl``: "timm" | "vitkern" | "torchvision"."""

    config: Config
    model: torch.nn.Module
    impl: str
    in_chans: int = 3
    _vitkern_done: bool = field(default=False, repr=False)

    # ----------------------------------------------------------------- shape facts
    def tokens(self) -> Tuple[int, int]:
        """(patch tokens of the first stage per image, prefix tokens such as CLS)."""
        cfg, m = self.config, self.model
        if cfg.spec.family in ("vit", "d2l"):
            if self.impl == "timm":
                return int(m.patch_embed.num_patches), int(getattr(m, "num_prefix_tokens", 1))
            return int(m.patch_embedding.num_patches), 1
        if cfg.spec.family in ("swin", "pvt"):
            return (cfg.resolution // 4) ** 2, 0
        return 0, 0

    # ----------------------------------------------------------------- backends
    def prepare(self, backend: str, device: torch.device) -> Union[Callable, str]:
        """A callable ``f(x) -> logits`` running this backend, or a string saying why it cannot run.

        Call in the order naive, sdpa, vitkern: the vitkern backend converts the model in place.
        """
        m = self.model
        if self.impl == "torchvision":
            return "FLOPs only (ResNet-50 is the seed's comparison model, not timed)"
        if backend == "naive":
            if self._vitkern_done:
                return "the model was already converted to vitkern modules"
            if self.impl == "timm":
                _set_fused_attn(m, False)
                return m
            from vitkern.models.vit import vit_reference_forward
            return lambda x: vit_reference_forward(m, x)
        if backend == "sdpa":
            if self.impl != "timm":
                return ("n/a: vitkern.models.ViT (the d2l ViT) has no SDPA path; timm's models do"
                        + ("" if has_timm() else " (pip install timm)"))
            if self._vitkern_done:
                return "the model was already converted to vitkern modules"
            _set_fused_attn(m, True)
            return m
        if backend == "vitkern":
            if device.type != "cuda":
                return vitkern_cpu_reason()
            if self.impl == "vitkern":
                return m  # built with backend="auto": fused Triton kernels on CUDA
            opt, why = find_optimize()
            if opt is None:
                return f"skipped: {why}"
            try:
                kwargs = {"backend": "auto"} if "backend" in inspect.signature(opt).parameters else {}
                out = opt(m, **kwargs)
            except Exception as exc:  # noqa: BLE001 - report, keep profiling the others
                return f"skipped: vitkern.optimize failed on {self.config.name}: {type(exc).__name__}: {exc}"
            self.model = out if isinstance(out, torch.nn.Module) else m
            self._vitkern_done = True
            converted = sum(type(mod).__module__.startswith("vitkern.") for mod in self.model.modules())
            if not converted:
                return f"skipped: vitkern.optimize converted no module of {self.config.name}"
            return self.model
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def vitkern_cpu_reason() -> str:
    return ("n/a on CPU: vitkern's kernels are Triton GPU kernels; on CPU its 'auto' backend runs the same "
            "naive reference as the 'naive' row, and Triton's interpreter (TRITON_INTERPRET=1) only checks "
            "correctness (its timings mean nothing)")


def find_optimize() -> Tuple[Optional[Callable], str]:
    """``vitkern.optimize`` (the timm-model converter), wherever it lives; (None, why) if absent."""
    errors = []
    try:
        import vitkern
        fn = getattr(vitkern, "optimize", None)
        if callable(fn) and not isinstance(fn, type(vitkern)):
            return fn, ""
    except Exception as exc:  # noqa: BLE001
        errors.append(f"vitkern.optimize: {exc}")
    for mod_name in ("vitkern.optimize", "vitkern.convert", "vitkern.models.optimize", "vitkern.models.convert"):
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("vitkern"):
                continue
            errors.append(f"{mod_name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{mod_name}: {type(exc).__name__}: {exc}")
            continue
        fn = getattr(mod, "optimize", None)
        if callable(fn):
            return fn, ""
    detail = f" ({'; '.join(errors)})" if errors else ""
    return None, f"vitkern.optimize (the timm-model converter) is not available in this installation{detail}"


def _set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    """timm's attention modules pick SDPA (True) or the unfused matmul-softmax-matmul path (False)."""
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = enabled


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Built under ``with torch.device(...)``, so only the dtype may need changing (and
    # ``.to()`` on fake parameters fails: leave float32 models alone).
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def build(config: Config, device: Union[str, torch.device], dtype: torch.dtype = torch.float32,
          *, impl: Optional[str] = None) -> Built:
    """Instantiate ``config`` on ``device`` (``"meta"`` for free FLOP counting) in ``dtype``.

    ``impl`` forces "timm" or "vitkern" for ViTs (default: timm when importable).
    Raises :class:`ModelUnavailable` when a needed package is missing.
    """
    spec, res = config.spec, config.resolution
    device = torch.device(device)
    ctx = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
    if spec.family == "cnn":
        if not has_torchvision():
            raise ModelUnavailable("ResNet-50 needs torchvision (pip install torchvision)")
        import torchvision
        with ctx:
            model = torchvision.models.resnet50(weights=None)
        return Built(config, _cast(model, dtype), "torchvision")
    if spec.family in ("swin", "pvt"):
        if not has_timm():
            raise ModelUnavailable(f"{spec.label} needs timm (pip install timm)")
        import timm
        kwargs = {"img_size": res} if spec.family == "swin" else {}
        with ctx:
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        return Built(config, _cast(model, dtype), "timm")
    patch = config.patch or spec.patch
    use = impl or ("timm" if spec.family == "vit" and has_timm() else "vitkern")
    if use == "timm":
        if not has_timm():
            raise ModelUnavailable("timm is not installed")
        from timm.models.vision_transformer import VisionTransformer
        with ctx:
            model = VisionTransformer(img_size=res, patch_size=patch, embed_dim=spec.embed_dim, depth=spec.depth,
                                      num_heads=spec.num_heads, mlp_ratio=spec.mlp_dim / spec.embed_dim,
                                      num_classes=1000)
        return Built(config, _cast(model, dtype), "timm")
    from vitkern.models import ViT
    in_chans = D2L_CHAPTER["in_chans"] if spec.family == "d2l" else 3
    num_classes = D2L_CHAPTER["num_classes"] if spec.family == "d2l" else 1000
    with ctx:
        model = ViT(res, patch, spec.embed_dim, spec.mlp_dim, spec.num_heads, spec.depth, 0.0, 0.0,
                    num_classes=num_classes, in_chans=in_chans, backend="auto")
    return Built(config, _cast(model, dtype), "vitkern", in_chans=in_chans)
