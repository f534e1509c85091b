"""Which backend runs a call, and why the others cannot.

Every functional op takes ``backend="auto" | "cuda" | "triton" | "torch"``:

* ``torch``  - the naive reference in :mod:`vitkern.reference`; runs anywhere.
* ``triton`` - vitkern's Triton kernels: CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before vitkern was imported (Triton's interpreter).
* ``cuda``   - the compiled ``vitkern._C`` kernels (GPU only). Never chosen by ``auto``
  until a kernel has been measured faster than Triton on a GPU.
* ``auto``   - CPU tensors: ``torch``. CUDA tensors: the op's measured preference
  order, skipping backends that cannot run the call.

Each op registers one predicate per backend. A predicate returns ``None`` when the
backend can run the call, else a sentence saying why not. Asking for a backend
explicitly raises :class:`BackendUnavailableError` with that sentence; when
nothing can run, the error lists every backend's reason.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

from vitkern import _triton

BACKENDS = ("auto", "cuda", "triton", "torch")
_log = logging.getLogger("vitkern.backends")

Predicate = Callable[..., Optional[str]]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def autocast_dtype(tensor) -> Optional[torch.dtype]:
    """The dtype autocast would cast to for ``tensor``'s device, or None when autocast is off.

    Our custom ops have no autocast rule, so each public op casts its inputs itself, as the module
    it replaces would. Devices autocast does not know (meta, for FLOP counting) are never autocast.
    """
    if not isinstance(tensor, torch.Tensor):
        return None
    device_type = tensor.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # e.g. "meta": no autocast for this device type
        return None
    return torch.get_autocast_dtype(device_type)


def check_name(backend, owner: str) -> str:
    """``backend`` if it is a known backend name, else a ValueError naming ``owner``."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _devices(tensors: Iterable[Optional[torch.Tensor]]):
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def triton_reason(tensors: Sequence[Optional[torch.Tensor]], dtype: torch.dtype) -> Optional[str]:
    """Generic reasons the Triton backend cannot run on these tensors."""
    if not _triton.HAS_TRITON:
        return f"Triton is not installed or failed to import ({_triton.TRITON_IMPORT_ERROR})"
    devices = _devices(tensors)
    if devices == {"cuda"}:
        if _triton.INTERPRET:
            return ("TRITON_INTERPRET=1 was set when vitkern was imported, so its Triton kernels run in the "
                    "interpreter, which is for CPU tensors; unset it to run them on the GPU")
        return None
    if devices == {"cpu"}:
        if not _triton.INTERPRET:
            return ("Triton kernels need CUDA tensors (got CPU tensors); set TRITON_INTERPRET=1 before "
                    "importing vitkern to run them on the CPU in Triton's interpreter (slow; for testing)")
        if dtype == torch.bfloat16:
            return "Triton's interpreter computes bfloat16 wrongly on CPU; bfloat16 needs a CUDA GPU"
        return None
    return f"Triton kernels need CUDA tensors (got {sorted(devices)})"


def cuda_extension_reason(op_name: str, tensors: Sequence[Optional[torch.Tensor]],
                          function: Optional[str] = None) -> Optional[str]:
    """Why the compiled backend cannot run ``op_name`` (its entry point ``function``), or None."""
    try:
        from vitkern import _C
    except ImportError:
        return ("vitkern._C (the compiled CUDA backend) is not built in this installation "
                "(setup.py builds it when nvcc is found; VITKERN_BUILD_CUDA=1 forces it)")
    if function is None or not hasattr(_C, function):
        return f"vitkern._C has no kernel for {op_name} yet"
    devices = _devices(tensors)
    if devices != {"cuda"}:
        return f"vitkern._C kernels need CUDA tensors (got {sorted(devices)})"
    return None


class OpBackends:
    """The backend predicates of one op, and the choice among them."""

    def __init__(self, op_name: str, predicates: Dict[str, Predicate], gpu_auto_order: Sequence[str]):
        missing = set(BACKENDS) - {"auto"} - set(predicates)
        if missing:
            raise ValueError(f"{op_name}: no predicate for backends {sorted(missing)}")
        if "torch" not in gpu_auto_order:
            raise ValueError(f"{op_name}: gpu_auto_order must end in the always-available 'torch'")
        self.op_name = op_name
        self.predicates = dict(predicates)
        self.gpu_auto_order = tuple(gpu_auto_order)

    def reasons(self, *args, **kwargs) -> Dict[str, Optional[str]]:
        """``{backend: None if it can run this call else why not}``."""
        return {name: pred(*args, **kwargs) for name, pred in self.predicates.items()}

    def select(self, requested: str, tensors: Sequence[Optional[torch.Tensor]], *args, **kwargs) -> str:
        check_name(requested, self.op_name)
        if requested != "auto":
            reason = self.predicates[requested](*args, **kwargs)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{self.op_name}: backend={requested!r} cannot run this call: {reason}")
            return requested
        order = self.gpu_auto_order if _devices(tensors) == {"cuda"} else ("torch",)
        skipped = {}
        for name in order:
            reason = self.predicates[name](*args, **kwargs)
            if reason is None:
                if skipped:
                    _log.debug("%s: auto chose %s; skipped %s", self.op_name, name, skipped)
                return name
            skipped[name] = reason
        details = "; ".join(f"{k}: {v}" for k, v in self.reasons(*args, **kwargs).items() if v)
        raise BackendUnavailableError(f"{self.op_name}: no backend can run this call ({details})")


_REGISTRY: Dict[str, OpBackends] = {}


def register(op_name: str, predicates: Dict[str, Predicate], gpu_auto_order: Sequence[str]) -> OpBackends:
    entry = OpBackends(op_name, predicates, gpu_auto_order)
    _REGISTRY[op_name] = entry
    return entry


def explain(op_name: str, *args, **kwargs) -> Dict[str, Optional[str]]:
    """Why each backend can or cannot run ``op_name`` on these arguments.

    >>> vitkern.backends.explain("patch_embed", x, weight)   # doctest: +SKIP
    {'cuda': 'vitkern._C ... is not built ...', 'triton': None, 'torch': None}
    """
    if op_name not in _REGISTRY:
        raise ValueError(f"op_name must be one of {sorted(_REGISTRY)}, got {op_name!r}")
    return _REGISTRY[op_name].reasons(*args, **kwargs)
