"""The min/max finiteness check finds every NaN and Inf that torch.isfinite finds."""

import pytest
import torch

from common.checks import all_finite, value_range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 16, 33, 4097])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_value_anywhere_is_found(dtype, n, bad):
    g = torch.Generator().manual_seed(n)
    for pos in {0, n // 2, n - 1}:
        t = torch.randn(n, generator=g).to(dtype)
        assert all_finite(t)
        t[pos] = bad
        assert not all_finite(t) and not torch.isfinite(t).all()
        if n % 2 == 0:
            assert not all_finite(t.view(2, n // 2).t())  # non-contiguous view


def test_range_empty_and_integer_tensors():
    assert value_range(torch.tensor([[-3.0, 2.5], [1.0, 0.0]])) == (-3.0, 2.5)
    assert value_range(torch.empty(0, 4)) == (0.0, 0.0) and all_finite(torch.empty(0))
    assert all_finite(torch.tensor([1, 2, 3])) and all_finite(torch.tensor([float("3e38")]))
