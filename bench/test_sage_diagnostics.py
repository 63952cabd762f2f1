"""The diagnostics' measures on known inputs (the run-reading part is exercised on real runs)."""
import sage_diagnostics as diag
import torch


def test_rank_correlation_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    a = torch.tensor([0.1, 3.0, 2.0, 5.0, 4.0], dtype=torch.float64)
    assert abs(diag.rank_correlation(a, a * 10 + 1) - 1.0) < 1e-12
    assert abs(diag.rank_correlation(a, -a) + 1.0) < 1e-12
    b = torch.tensor([3.0, 0.1, 5.0, 2.0, 4.0], dtype=torch.float64)
    assert abs(diag.rank_correlation(a, b)) < 1.0


def test_top_overlap_counts_the_hardest_rows_inside_the_top_regions():
    own = torch.arange(10, dtype=torch.float64)           # rows 7, 8, 9 are the hardest 30%
    assert diag.top_overlap(own, own) == 1.0
    assert diag.top_overlap(own, -own) == 0.0
    region = torch.tensor([9, 8, 0, 0, 0, 0, 0, 7, 1, 2], dtype=torch.float64)  # top regions: rows 0, 1, 7
    assert diag.top_overlap(own, region) == 1 / 3
