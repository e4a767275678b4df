"""Data-parallel calibration: shards of the calibration blocks in 2 gloo processes give the single-process sums."""

import pytest
import torch
from parallel_workers import calibration_blocks, collect_shard, fail
from tiny_models import tiny_llama

from nsn_peft import collect_activation_stats, collect_gradient_stats
from nsn_peft.calibrate.parallel import run_data_parallel, shard_blocks


def test_shards_cover_every_block_once():
    blocks = calibration_blocks(7)
    shards = [shard_blocks(blocks, rank, 3) for rank in range(3)]
    assert [s.shape[0] for s in shards] == [3, 2, 2]
    assert sorted(tuple(r.tolist()) for s in shards for r in s) == sorted(tuple(r.tolist()) for r in blocks)
    assert torch.equal(shard_blocks(blocks), blocks)  # no process group: everything
    with pytest.raises(ValueError, match="2 calibration block.*3 processes"):
        shard_blocks(blocks[:2], 0, 3)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_blocks(blocks, 3, 3)


def test_two_gloo_processes_give_the_single_process_statistics():
    parallel = run_data_parallel(collect_shard, 2)
    assert parallel["world_size"] == 2 and parallel["shard"] == 4  # rank 0 ran 4 of the 7 blocks
    # One block per batch: the float32 batch products are the same in both runs, only the float64 sums' order differs.
    for kind, collect in (("activation", collect_activation_stats), ("output_gradient", collect_gradient_stats)):
        single = collect(tiny_llama(), calibration_blocks(), max_tokens=None, batch_size=1, show_progress=False)
        assert parallel[kind]["counts"] == single.token_counts
        assert list(parallel[kind]["grams"]) == list(single.grams)
        for name, gram in single.grams.items():
            torch.testing.assert_close(
                parallel[kind]["grams"][name], gram, rtol=1e-12, atol=1e-12 * float(gram.abs().max())
            )


@pytest.mark.slow
def test_a_failing_process_fails_the_run():
    with pytest.raises(Exception, match="this process fails"):
        run_data_parallel(fail, 2)
