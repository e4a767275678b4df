"""Rank samplers and rank buckets: determinism, coverage, grid membership, state round trips."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsn_peft.linalg.flops import rank_grid
from nsn_peft.training import (
    FixedRankSampler,
    RankBuckets,
    SandwichRankSampler,
    ScheduledRankSampler,
    StagedRankSampler,
    UniformRankSampler,
    as_rank_sampler,
    make_rank_sampler,
)

GRID = rank_grid(576, 64)  # SmolLM2 MLP: [64, 128, ..., 512, 576]


def _samplers(seed=0):
    return [
        UniformRankSampler(2, seed=seed, grid=GRID),
        SandwichRankSampler(2, seed=seed, grid=GRID),
        FixedRankSampler([128, 576], seed=seed, grid=GRID),
    ]


@pytest.mark.parametrize("index", range(3))
def test_same_seed_same_ranks_and_pure_in_step(index):
    a, b = _samplers(seed=3)[index], _samplers(seed=3)[index]
    seq_a = [a.sample(s) for s in range(50)]
    # Any order of calls gives the same ranks for a step: there is no running random state.
    seq_b = [b.sample(s) for s in reversed(range(50))][::-1]
    assert seq_a == seq_b
    assert a.sample(17) == a(17) == seq_a[17]


def test_different_seeds_differ():
    a = UniformRankSampler(2, seed=0, grid=GRID)
    b = UniformRankSampler(2, seed=1, grid=GRID)
    assert [a.sample(s) for s in range(30)] != [b.sample(s) for s in range(30)]


def test_uniform_covers_the_grid_evenly():
    sampler = UniformRankSampler(2, seed=0, grid=GRID)
    counts = dict.fromkeys(GRID, 0)
    steps = 900
    for step in range(steps):
        ranks = sampler.sample(step)
        assert len(ranks) == 2 and len(set(ranks)) == 2
        assert ranks == sorted(ranks, reverse=True)
        for r in ranks:
            counts[r] += 1
    expected = steps * 2 / len(GRID)
    assert all(0.75 * expected < c < 1.25 * expected for c in counts.values()), counts


def test_sandwich_has_max_min_and_covers_interior():
    sampler = SandwichRankSampler(2, seed=5, grid=GRID)
    seen = set()
    for step in range(200):
        ranks = sampler.sample(step)
        assert ranks[0] == 576 and ranks[-1] == 64 and len(ranks) == 4
        seen.update(ranks)
    assert seen == set(GRID)


def test_sandwich_small_grids():
    assert SandwichRankSampler(3, grid=[8]).sample(0) == [8]
    assert SandwichRankSampler(3, grid=[8, 16]).sample(0) == [16, 8]
    assert SandwichRankSampler(5, grid=[8, 16, 24]).sample(0) == [24, 16, 8]
    assert SandwichRankSampler(0, grid=GRID).sample(4) == [576, 64]


def test_fixed_sampler_validates_grid_membership():
    with pytest.raises(ValueError, match=r"\[100\].*granularity grid"):
        FixedRankSampler([100, 128], grid=GRID)
    with pytest.raises(ValueError, match="at least one rank"):
        FixedRankSampler([])
    assert FixedRankSampler([576, 128, 576], grid=GRID).sample(9) == [576, 128]


def test_uniform_rejects_too_many_ranks():
    with pytest.raises(ValueError, match="num_ranks=11"):
        UniformRankSampler(11, grid=GRID)
    with pytest.raises(ValueError, match="num_ranks"):
        UniformRankSampler(0)


def test_unbound_sampler_explains_itself():
    with pytest.raises(RuntimeError, match="bind"):
        SandwichRankSampler(2).sample(0)


def test_bad_grids_and_steps():
    with pytest.raises(ValueError, match="ascending"):
        SandwichRankSampler(1).bind([128, 64])
    with pytest.raises(ValueError, match="step"):
        SandwichRankSampler(1, grid=GRID).sample(-1)


def test_scheduled_hook_and_validation():
    sampler = ScheduledRankSampler(lambda step: [576] if step < 10 else [576, 64], grid=GRID)
    assert sampler.sample(3) == [576]
    assert sampler.sample(12) == [576, 64]
    with_rng = ScheduledRankSampler(lambda step, rng: [576, rng.choice(GRID[:-1])], seed=2, grid=GRID)
    assert [with_rng.sample(s) for s in range(20)] == [with_rng.sample(s) for s in range(20)]
    bad = ScheduledRankSampler(lambda step: [100], grid=GRID)
    with pytest.raises(ValueError, match=r"rank 100 at step 0.*not a selectable rank"):
        bad.sample(0)
    with pytest.raises(ValueError, match="callable"):
        ScheduledRankSampler([64])


def test_staged_sampler_switches():
    staged = StagedRankSampler([(0, FixedRankSampler([576])), (5, SandwichRankSampler(1, seed=1))], grid=GRID)
    assert all(staged.sample(s) == [576] for s in range(5))
    assert all(staged.sample(s)[0] == 576 and staged.sample(s)[-1] == 64 for s in range(5, 20))
    with pytest.raises(ValueError, match="step 0"):
        StagedRankSampler([(3, FixedRankSampler([576]))])


@pytest.mark.parametrize("index", range(3))
def test_state_round_trip_through_json(index):
    original = _samplers(seed=11)[index]
    state = json.loads(json.dumps(original.state_dict()))
    fresh = [UniformRankSampler(2, seed=0), SandwichRankSampler(2, seed=0), FixedRankSampler([576], seed=0)][index]
    fresh.load_state_dict(state)
    assert fresh.seed == 11 and fresh.grid == GRID
    assert [fresh.sample(s) for s in range(40)] == [original.sample(s) for s in range(40)]


def test_state_type_mismatch_and_staged_round_trip():
    with pytest.raises(ValueError, match="'uniform'.*SandwichRankSampler"):
        SandwichRankSampler(2).load_state_dict(UniformRankSampler(2, grid=GRID).state_dict())
    staged = StagedRankSampler([(0, FixedRankSampler([576])), (5, UniformRankSampler(2, seed=4))], grid=GRID)
    state = json.loads(json.dumps(staged.state_dict()))
    other = StagedRankSampler([(0, FixedRankSampler([576])), (5, UniformRankSampler(2, seed=0))])
    other.load_state_dict(state)
    assert [other.sample(s) for s in range(30)] == [staged.sample(s) for s in range(30)]


def test_factories():
    assert isinstance(make_rank_sampler("uniform", num_ranks=3), UniformRankSampler)
    assert isinstance(make_rank_sampler("fixed", ranks=[64]), FixedRankSampler)
    with pytest.raises(ValueError, match="Unknown rank sampler 'zigzag'"):
        make_rank_sampler("zigzag")
    assert isinstance(as_rank_sampler(None), SandwichRankSampler)
    assert isinstance(as_rank_sampler([64, 128]), FixedRankSampler)
    assert isinstance(as_rank_sampler(lambda step: [64]), ScheduledRankSampler)
    with pytest.raises(ValueError, match="rank_sampler"):
        as_rank_sampler("sandwich")


@settings(max_examples=60, deadline=None)
@given(
    max_rank=st.integers(1, 2048),
    granularity=st.integers(1, 256),
    k=st.integers(0, 4),
    seed=st.integers(0, 2**31),
    step=st.integers(0, 10**6),
)
def test_property_ranks_are_on_grid_distinct_and_sorted(max_rank, granularity, k, seed, step):
    grid = rank_grid(max_rank, granularity)
    for sampler in (UniformRankSampler(min(max(k, 1), len(grid)), seed=seed), SandwichRankSampler(k, seed=seed)):
        ranks = sampler.bind(grid).sample(step)
        assert ranks and set(ranks) <= set(grid)
        assert ranks == sorted(set(ranks), reverse=True)
        assert ranks == sampler.sample(step)


def test_rank_buckets():
    buckets = RankBuckets(GRID, 3)
    assert buckets.members == [[64, 128, 192], [256, 320, 384], [448, 512, 576]]
    assert buckets.labels == ["64-192", "256-384", "448-576"]
    assert [buckets(r) for r in (64, 256, 576)] == [0, 1, 2]
    assert RankBuckets(GRID).labels == [str(r) for r in GRID]
    uneven = RankBuckets([8, 16, 24, 32, 40], 2)
    assert uneven.members == [[8, 16, 24], [32, 40]]
    with pytest.raises(ValueError, match="not one of the selectable ranks"):
        buckets.bucket(100)
    with pytest.raises(ValueError, match=r"num_buckets must be an int in \[1, 9\]"):
        RankBuckets(GRID, 10)


def test_rank_buckets_partition_property():
    rng = random.Random(0)
    for _ in range(50):
        grid = rank_grid(rng.randint(1, 1000), rng.randint(1, 128))
        n = rng.randint(1, len(grid))
        buckets = RankBuckets(grid, n)
        assert [r for m in buckets.members for r in m] == grid
        sizes = [len(m) for m in buckets.members]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
