"""The tests' name for :mod:`vitkern.testing` (the correctness policy lives there)."""
from vitkern.testing import (FORWARD_FACTOR, FP32_RTOL, GRAD_FACTOR, TF32_RTOL, assert_close,  # noqa: F401
                             assert_drop_in_signature, nan_padded, poison_outputs, rel_err)


def use_gpu_tiles(monkeypatch, module, *names):
    """Make ``module``'s config functions ``names`` pick their GPU tiles (not the interpreter's), so the
    interpreter runs the tiles a GPU launch gets."""
    from vitkern import _triton

    def on_gpu(fn):
        def wrapped(*args, **kwargs):
            with monkeypatch.context() as m:
                m.setattr(_triton, "INTERPRET", False)
                return fn(*args, **kwargs)
        return wrapped

    for name in names:
        monkeypatch.setattr(module, name, on_gpu(getattr(module, name)))
