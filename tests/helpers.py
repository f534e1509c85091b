"""The tests' name for :mod:`vitkern.testing` (the correctness policy lives there)."""
from vitkern.testing import (FORWARD_FACTOR, FP32_RTOL, GRAD_FACTOR, TF32_RTOL, assert_close,  # noqa: F401
                             assert_drop_in_signature, nan_padded, poison_outputs, rel_err)
