"""Static check of kd_loss's launch configurations: no GPU needed.

Every candidate the autotuner may pick for rows of few classes must launch at least one program per
SM of a 132-SM GPU (H100, H200) for a batch of 65,536 rows; otherwise SMs idle and the launch is
latency-bound, whichever candidate wins the tuning.
"""
import importlib

import pytest

kd_module = importlib.import_module("sage_fast.ops.kd_loss")


def programs(n_rows, block_rows):
    return -(-n_rows // block_rows)


@pytest.mark.parametrize("elem_bytes", [4, 2], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_classes", [1, 2, 3, 4, 5, 7, 8, 10, 16, 31, 64, 100, 1000, 32000, 128000])
def test_every_candidate_covers_the_sms_at_a_typical_batch(n_classes, elem_bytes):
    configs = kd_module._gpu_configs(n_classes, elem_bytes, kd_module.MAX_BLOCK_C)
    assert configs, "no candidate at all"
    assert (kd_module.TYPICAL_ROWS, kd_module.GPU_SMS) == (65536, 132)
    for block_rows, block_c, warps in configs:
        assert programs(65536, block_rows) >= 132, (block_rows, block_c, warps)
        # whole 16-byte vectors per thread and input, and a tile that covers the row (or streams it)
        assert block_rows * block_c * elem_bytes % (16 * 32 * warps) == 0, (block_rows, block_c, warps)
        assert block_rows == 1 or block_c >= n_classes


@pytest.mark.parametrize("n_classes", [2, 3, 8])
def test_few_classes_keep_a_choice_of_tiles(n_classes):
    """The tuner still chooses among several shapes (rows per program, warps) for narrow rows."""
    configs = kd_module._gpu_configs(n_classes, 4, kd_module.MAX_BLOCK_C)
    assert len(configs) >= 2 and len(set(configs)) == len(configs)
