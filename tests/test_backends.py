"""vitkern.backends: the registry of which backends each op implements, and why the others cannot run.

* an op registers only the backends it has; every other backend answers why by itself;
* ``explain(op_name, *args, **kwargs)`` takes the public op's own arguments (positional and
  keyword, as the op does) and returns every backend's reason; bad arguments raise the op's error;
* ``auto`` picks the reference on CPU tensors and the one default order on CUDA tensors;
* an explicit backend that cannot run raises with the reason; registration is checked.
"""
from types import SimpleNamespace

import pytest
import torch

import vitkern
from vitkern import backends
from vitkern.backends import BackendUnavailableError

OPS = ("patch_embed", "attention", "attention_packed", "window_attention", "sr_attention")


def _public_args(op):
    """Small valid arguments for each public op, as a user would pass them."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if op == "patch_embed":
        return (r(1, 3, 8, 8), r(4, 3, 4, 4)), {"cls_token": r(1, 1, 4)}
    if op == "attention":
        return (r(1, 2, 5, 8), r(1, 2, 6, 8), r(1, 2, 6, 8)), {"is_causal": True}
    if op == "attention_packed":
        return (r(1, 5, 3 * 2 * 8), 2), {}
    if op == "window_attention":
        return (r(1, 7, 7, 3 * 4), r(13 * 13, 2)), {"num_heads": 2, "window_size": 7}
    C = 8
    params = dict(q_weight=r(C, C), q_bias=r(C), kv_weight=r(2 * C, C), kv_bias=r(2 * C), proj_weight=r(C, C),
                  proj_bias=r(C), sr_weight=r(C, C, 2, 2), sr_bias=r(C), norm_weight=r(C), norm_bias=r(C))
    return (r(1, 16, C), (4, 4)), {"num_heads": 2, "sr_ratio": 2, **params}


@pytest.mark.parametrize("op", OPS)
def test_explain_takes_the_public_arguments(op):
    args, kwargs = _public_args(op)
    reasons = vitkern.backends.explain(op, *args, **kwargs, backend="auto")
    assert set(reasons) == {"cuda", "triton", "torch"}
    assert reasons["torch"] is None
    assert reasons["cuda"]  # no GPU here, or no CUDA kernel for the op
    # The same call runs, and the reasons are the op's own: the chosen backend is one with no reason.
    fn = getattr(vitkern.ops, op)
    assert fn(*args, **kwargs).numel() > 0


def test_explain_names_backends_an_op_does_not_implement():
    args, kwargs = _public_args("window_attention")
    reasons = vitkern.backends.explain("window_attention", *args, **kwargs)
    assert "vitkern._C has no window_attention kernel" in reasons["cuda"]
    assert "patch_embed" in reasons["cuda"]  # the one op the compiled backend implements
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run this call: vitkern._C has no"):
        vitkern.ops.window_attention(*args, **kwargs, backend="cuda")


def test_explain_raises_the_ops_own_error_on_bad_arguments():
    args, kwargs = _public_args("window_attention")
    with pytest.raises(ValueError, match="window_attention: shift_size must satisfy"):
        vitkern.backends.explain("window_attention", *args, **dict(kwargs, shift_size=9))
    with pytest.raises(ValueError, match="op_name must be one of"):
        vitkern.backends.explain("flash", *args)


def test_registry_checks_what_an_op_registers():
    prepare = lambda *a, **k: SimpleNamespace()  # noqa: E731
    with pytest.raises(ValueError, match="unknown backends"):
        backends.OpBackends("x", prepare, {"torch": backends.available, "cudnn": backends.available})
    with pytest.raises(ValueError, match="every op has the torch reference"):
        backends.OpBackends("x", prepare, {"triton": backends.available})
    with pytest.raises(ValueError, match="auto_order must end in"):
        backends.OpBackends("x", prepare, {"triton": backends.available, "torch": backends.available},
                            auto_order=("torch", "triton"))


def test_select_auto_order_and_explicit_requests():
    calls = []

    def triton_pred(call):
        calls.append("triton")
        return None if call.ok else "not today"

    entry = backends.OpBackends("demo", lambda **k: SimpleNamespace(**k),
                                {"triton": triton_pred, "torch": backends.available})
    cpu = SimpleNamespace(x=torch.zeros(1), ok=True)
    assert entry.select("auto", cpu) == "torch" and calls == []  # CPU tensors: the reference, nothing asked
    meta_cuda = SimpleNamespace(x=torch.empty(1, device="meta"), ok=True)
    assert entry.select("auto", meta_cuda) == "torch"  # not CUDA tensors either
    assert entry.select("triton", cpu) == "triton"
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run this call: not today"):
        entry.select("triton", SimpleNamespace(x=torch.zeros(1), ok=False))
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run this call: vitkern._C has no demo"):
        entry.select("cuda", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        entry.select("flash", cpu)
