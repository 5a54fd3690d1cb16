"""Tolerances for comparing two fp32 computations that do the same arithmetic in another order.

A forward run in another batch layout (rows mixed in one batch vs separate calls), another thread count
or another CPU's BLAS kernels sums the same products in another order. Each reordered dot product of
length K is off by up to ~K * eps * |terms| in the worst case, ~sqrt(K) * eps typically; through the
few layers of a tiny test model that stays well under 2^7 = 128 ulps of the unit-size outputs, i.e.
~1.5e-5 relative. We allow 8x that: a real mistake (a token in the wrong place, a wrong row, a sign)
moves these outputs by 1e-2 or more, three orders of magnitude above the tolerance.
"""

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23 ~ 1.19e-7
REORDERED_FP32 = dict(rtol=1024 * FP32_EPS, atol=1024 * FP32_EPS)  # ~1.2e-4


def close(a, b):
    return torch.allclose(a, b, **REORDERED_FP32)
