"""How the tests compare numbers, so that a verdict does not depend on the CPU that gives it.

Two implementations of one function (ours vs torchaudio, conv1d vs conv2d, an export vs its source) are compared
in float64 with ``assert_same_math``: whatever kernels a CPU picks (ATEN_CPU_CAPABILITY, thread count), their
rounding differences stay near 1e-14 (Base's first layers, values up to 6: 1.5e-14 to 1.9e-14 under
``default``, ``avx2`` and ``avx512``), while a real change of the function, even one fp32 ulp in one weight of
one layer, moves that layer's output by 3.6e-10 (test_model.py shows it is caught). In fp32 the same two
kernels differ by 1e-5 and more, which is what made fixed fp32 tolerances fail on some CPUs.

Where fp32 itself is the point (upstream's logits are fp32 by design; what a user's fp32 run gives),
``assert_fp32_close`` allows a number of fp32 ulps of the values' scale, never a fixed absolute number.

Bit-exact checks (``torch.equal``) remain where the same kernels run on both sides: a run resumed on the
machine that ran it uninterrupted, a copy, a scripted module against its eager self.
"""
import copy

import torch

FP64_TOL = 1e-12
FP32_EPS = torch.finfo(torch.float32).eps


def assert_same_math(actual, expected, msg=None):
    """Equal to float64 rounding: ``|a - b| <= 1e-12 (1 + |b|)``."""
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=FP64_TOL, atol=FP64_TOL, msg=msg)


def assert_fp32_close(actual, expected, ulps=64, scale=None, msg=None):
    """Within ``ulps`` fp32 ulps of ``scale`` (the largest ``|expected|`` unless given): rounding in fp32 is
    relative to the operands, which the largest value bounds, so values near zero get the same absolute room."""
    scale = expected.detach().abs().max().item() if scale is None else scale
    tol = ulps * FP32_EPS
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, check_dtype=False, msg=msg)


def float64_copies(*modules):
    """Float64 copies of ``modules``, the originals left as they are (fixtures, fp32 files' models)."""
    return [copy.deepcopy(m).double() for m in modules]
