"""The per-segment error the bf16 GPU tests use must see what a whole-tensor error averages away."""

import pytest
import torch

from tests.kernels.segments import each_row, worst_segment_error


def _bf16_result(rows=4000, cols=96):
    ref = torch.randn(rows, cols, dtype=torch.float64)
    return ref.bfloat16(), ref


def test_correct_bf16_result_passes_and_a_dropped_row_fails():
    ours, ref = _bf16_result()
    bounds = [0, 1, 1000, 1001, 3999, 4000]  # one-row segments at both ends and in the middle, an empty one
    assert worst_segment_error(ours, ref, bounds)[0] < 5e-3
    broken = ours.clone()
    broken[1000] = 0  # the one-row segment 2 lost
    whole = ((broken.double() - ref).norm() / ref.norm()).item()
    assert whole < 2e-2  # what a whole-tensor 2e-2 check would let through
    err, seg = worst_segment_error(broken, ref, bounds)
    assert seg == 2 and err > 0.5  # ~1: its own norm, or the typical one if smaller
    err, row = worst_segment_error(broken, ref, each_row(4000))
    assert row == 1000 and err > 0.5


def test_zero_reference_segment_is_measured_against_the_typical_scale():
    ours, ref = _bf16_result(rows=10)
    ref[3:5] = 0  # an empty group's dW, dQ of a one-token document
    ours = ref.clone()
    ours[3:5] = 1e-4 * torch.randn(2, ref.shape[1], dtype=torch.float64)  # rounding-sized noise: fine
    assert worst_segment_error(ours, ref, [0, 3, 5, 10])[0] < 1e-3
    ours[3:5] = torch.randn(2, ref.shape[1], dtype=torch.float64)  # garbage where zeros belong: caught
    err, seg = worst_segment_error(ours, ref, [0, 3, 5, 10])
    assert seg == 1 and err > 0.5


def test_bad_bounds_and_shapes_are_refused():
    ours, ref = _bf16_result(rows=6)
    for bounds in ([0, 3], [1, 6], [0, 4, 2, 6]):
        with pytest.raises(ValueError, match="bounds"):
            worst_segment_error(ours, ref, bounds)
    with pytest.raises(ValueError, match="shapes differ"):
        worst_segment_error(ours[:5], ref, [0, 6])
