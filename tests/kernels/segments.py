"""Per-segment error for the bf16 GPU tests.

A whole-tensor relative error of 2e-2 averages a broken segment away: one dropped 1-row group among 4,000 rows
moves it by ~1.6e-2. Measured segment by segment (a group of a grouped GEMM, a packed document, an expert's weight
slice, a token row) the same defect reads ~1.0.
"""

import torch


def worst_segment_error(ours: torch.Tensor, ref: torch.Tensor, bounds) -> tuple[float, int]:
    """Largest relative norm error over the row segments [bounds[i], bounds[i+1]) of dim 0, and its index i.

    ours, ref: same shape [R, ...], any float dtype (compared in fp64); bounds: R+1-ending non-decreasing ints.
    Each segment's error is ||ours_s - ref_s|| / max(||ref_s||, ||ref|| * sqrt(R_s / R)): its own norm, or the norm
    a segment of its size would have if the tensor's energy were spread evenly. The second term keeps segments
    whose exact result is (near) zero - an empty group's dW, dQ of a one-token document - measurable instead of
    dividing by zero. Empty segments are skipped.
    """
    if ours.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} vs {tuple(ref.shape)}")
    bounds = [int(b) for b in bounds]
    rows = ref.shape[0]
    if bounds[0] != 0 or bounds[-1] != rows or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"bounds must rise from 0 to {rows}: {bounds[:4]}...{bounds[-4:]}")
    d = (ours.detach().double().cpu() - ref.detach().double().cpu()).reshape(rows, -1)
    r = ref.detach().double().cpu().reshape(rows, -1)
    zero = torch.zeros(1, dtype=torch.float64)
    d_cum = torch.cat([zero, d.square().sum(1).cumsum(0)])  # prefix sums: one pass for any number of segments
    r_cum = torch.cat([zero, r.square().sum(1).cumsum(0)])
    b = torch.tensor(bounds)
    lo, hi = b[:-1], b[1:]
    size = (hi - lo).double()
    seg_d = (d_cum[hi] - d_cum[lo]).clamp_min(0).sqrt()
    seg_r = (r_cum[hi] - r_cum[lo]).clamp_min(0).sqrt()
    even = r_cum[-1].sqrt() * (size / max(rows, 1)).sqrt()
    err = torch.where(size > 0, seg_d / torch.maximum(seg_r, even).clamp_min(1e-300), torch.zeros_like(seg_d))
    worst = int(err.argmax())
    return float(err[worst]), worst


def each_row(rows: int) -> range:
    """Bounds that make every row its own segment."""
    return range(rows + 1)
