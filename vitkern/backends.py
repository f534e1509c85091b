"""Which backend runs a call, and why the others cannot.

Every functional op takes ``backend="auto" | "cuda" | "triton" | "torch"``:

* ``torch``  - the naive reference in :mod:`vitkern.reference`; runs anywhere.
* ``triton`` - vitkern's Triton kernels: CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before vitkern was imported (Triton's interpreter).
* ``cuda``   - the compiled ``vitkern._C`` kernels (GPU only), for the ops that have one.
* ``auto``   - CPU tensors: ``torch``. CUDA tensors: the first backend of :data:`AUTO_ORDER`
  (the one measured order, unless an op registers its own) that can run the call.

An op registers only the backends it implements, each with a predicate that returns ``None``
when the backend can run the call, else a sentence saying why not; a backend it does not
implement answers "has no ... kernel" by itself. An op also registers its ``prepare``
function: the public boundary that normalises and validates the public arguments once and
returns the finished call the predicates (and the launchers) read. So
:func:`explain` takes the public op's own arguments::

    >>> vitkern.backends.explain("window_attention", qkv, table, num_heads=3, window_size=7)  # doctest: +SKIP
    {'cuda': 'vitkern._C has no window_attention kernel (...)', 'triton': None, 'torch': None}

Asking for a backend explicitly raises :class:`BackendUnavailableError` with its reason;
when nothing can run, the error lists every backend's reason.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from vitkern import _triton

KERNEL_BACKENDS = ("cuda", "triton", "torch")
BACKENDS = ("auto",) + KERNEL_BACKENDS
#: ``auto``'s order on CUDA tensors, for every op unless it registers its own: Triton's kernels,
#: then the reference. ``cuda`` joins only where a vitkern._C kernel is measured faster.
AUTO_ORDER = ("triton", "torch")
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


def cuda_extension_reason(op_name: str, tensors: Sequence[Optional[torch.Tensor]], function: str) -> Optional[str]:
    """Why the compiled backend cannot run ``op_name`` (its entry point ``function``), or None."""
    try:
        from vitkern import _C
    except ImportError:
        return ("vitkern._C (the compiled CUDA backend) is not built in this installation "
                "(setup.py builds it when nvcc is found; VITKERN_BUILD_CUDA=1 forces it)")
    if not hasattr(_C, function):
        return f"this vitkern._C build has no {function} (rebuild the extension)"
    devices = _devices(tensors)
    if devices != {"cuda"}:
        return f"vitkern._C kernels need CUDA tensors (got {sorted(devices)})"
    return None


def _call_tensors(call) -> List[torch.Tensor]:
    """The tensors of a prepared call (its attributes, one level into lists, tuples and dicts)."""
    found = []
    for v in vars(call).values():
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
        found += [t for t in items if isinstance(t, torch.Tensor)]
    return found


def available(call) -> Optional[str]:
    """The predicate of a backend that runs every valid call (the torch reference)."""
    return None


class OpBackends:
    """The backends one op implements, its public-boundary ``prepare``, and the choice among them."""

    def __init__(self, op_name: str, prepare: Callable[..., object], predicates: Dict[str, Predicate],
                 auto_order: Sequence[str] = AUTO_ORDER):
        unknown = set(predicates) - set(KERNEL_BACKENDS)
        if unknown:
            raise ValueError(f"{op_name}: unknown backends {sorted(unknown)}; known: {KERNEL_BACKENDS}")
        if "torch" not in predicates:
            raise ValueError(f"{op_name}: every op has the torch reference; register a 'torch' predicate")
        order = tuple(b for b in auto_order if b in predicates)
        if not order or order[-1] != "torch":
            raise ValueError(f"{op_name}: auto_order must end in the always-available 'torch', got {auto_order}")
        self.op_name = op_name
        self.prepare = prepare
        self.predicates = dict(predicates)
        self.auto_order = order

    def reason(self, name: str, call) -> Optional[str]:
        """Why backend ``name`` cannot run the prepared ``call``, or None when it can."""
        predicate = self.predicates.get(name)
        if predicate is None:
            return (f"vitkern._C has no {self.op_name} kernel (the compiled backend implements "
                    f"{', '.join(ops_with('cuda')) or 'no op'} so far)" if name == "cuda"
                    else f"vitkern has no {name} implementation of {self.op_name}")
        return predicate(call)

    def reasons(self, call) -> Dict[str, Optional[str]]:
        """``{backend: None if it can run the prepared call else why not}``, for every backend."""
        return {name: self.reason(name, call) for name in KERNEL_BACKENDS}

    def select(self, requested: str, call) -> str:
        """The backend to run the prepared ``call``: ``requested``, or ``auto``'s choice."""
        check_name(requested, self.op_name)
        if requested != "auto":
            why = self.reason(requested, call)
            if why is not None:
                raise BackendUnavailableError(f"{self.op_name}: backend={requested!r} cannot run this call: {why}")
            return requested
        order = self.auto_order if _devices(_call_tensors(call)) == {"cuda"} else ("torch",)
        skipped = {}
        for name in order:
            why = self.reason(name, call)
            if why is None:
                if skipped:
                    _log.debug("%s: auto chose %s; skipped %s", self.op_name, name, skipped)
                return name
            skipped[name] = why
        details = "; ".join(f"{k}: {v}" for k, v in self.reasons(call).items() if v)
        raise BackendUnavailableError(f"{self.op_name}: no backend can run this call ({details})")


_REGISTRY: Dict[str, OpBackends] = {}


def ops_with(backend: str) -> List[str]:
    """The registered ops that implement ``backend``."""
    return sorted(name for name, entry in _REGISTRY.items() if backend in entry.predicates)


def register(op_name: str, *, prepare: Callable[..., object], predicates: Dict[str, Predicate],
             auto_order: Sequence[str] = AUTO_ORDER) -> OpBackends:
    """Register ``op_name``'s public-boundary ``prepare`` (public arguments -> a validated call)
    and a predicate per backend it implements (prepared call -> None or why not)."""
    entry = OpBackends(op_name, prepare, predicates, auto_order)
    _REGISTRY[op_name] = entry
    return entry


def explain(op_name: str, *args, **kwargs) -> Dict[str, Optional[str]]:
    """Why each backend can or cannot run ``op_name`` on these arguments (the public op's own).

    >>> vitkern.backends.explain("patch_embed", x, weight, cls_token=cls)   # doctest: +SKIP
    {'cuda': 'vitkern._C ... is not built ...', 'triton': None, 'torch': None}

    Invalid arguments raise the same error the op would.
    """
    import vitkern.ops  # noqa: F401 - the ops register themselves on import
    if op_name not in _REGISTRY:
        raise ValueError(f"op_name must be one of {sorted(_REGISTRY)}, got {op_name!r}")
    entry = _REGISTRY[op_name]
    kwargs.pop("backend", None)
    return entry.reasons(entry.prepare(*args, **kwargs))
