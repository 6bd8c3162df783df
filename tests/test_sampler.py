"""The mixed batch sampler: exact ratio, no replacement, disjoint rank slices, resumability."""

from __future__ import annotations

import itertools

from boxcaseg.data.sampler import BOX, SALIENT, MixedBatchSampler, split_batch


def test_exact_ratio_every_batch():
    s = MixedBatchSampler(500, 70, 9, 7, seed=3, end_step=40)
    for batch in s:
        kinds = [k for k, _, _ in batch]
        assert kinds.count(BOX) == 9 and kinds.count(SALIENT) == 7


def test_epoch_is_one_pass_over_salient_and_box_without_replacement():
    s = MixedBatchSampler(100, 70, 9, 7, seed=5, end_step=30)
    spe = s.steps_per_epoch()
    assert spe == 10
    for epoch in range(3):
        sal = [i for step in range(epoch * spe, (epoch + 1) * spe) for k, i, _ in s.batch(step) if k == SALIENT]
        assert sorted(sal) == list(range(70))
    # box draws: consecutive windows of 100 draws are permutations, continuing across epochs
    box = [i for step in range(30) for k, i, _ in s.batch(step) if k == BOX]
    for c in range(len(box) // 100):
        assert sorted(box[c * 100:(c + 1) * 100]) == list(range(100))


def test_rank_slices_are_disjoint_and_cover():
    world = 3
    samplers = [MixedBatchSampler(301, 90, 4, 3, seed=1, rank=r, world_size=world, end_step=10) for r in range(world)]
    spe = samplers[0].steps_per_epoch()
    sal = [set(i for st in range(spe) for k, i, _ in s.batch(st) if k == SALIENT) for s in samplers]
    for a, b in itertools.combinations(sal, 2):
        assert not a & b
    assert set().union(*sal) == set(range(90))
    per = [len(s._box_slice(0)) for s in samplers]
    box = [set(i for st in range(per[r] // 4) for k, i, _ in s.batch(st) if k == BOX) for r, s in enumerate(samplers)]
    for a, b in itertools.combinations(box, 2):
        assert not a & b
    for s in samplers:
        for batch in s:
            assert [k for k, _, _ in batch].count(SALIENT) == 3


def test_resumed_sampler_draws_the_same():
    full = list(MixedBatchSampler(50, 20, 3, 2, seed=9, end_step=12))
    tail = list(MixedBatchSampler(50, 20, 3, 2, seed=9, start_step=7, end_step=12))
    assert full[7:] == tail
    other = list(MixedBatchSampler(50, 20, 3, 2, seed=10, end_step=12))
    assert other != full


def test_split_batch_keeps_ratio():
    assert split_batch(16, 9, 7) == (9, 7)
    assert split_batch(32, 9, 7) == (18, 14)
    assert split_batch(2, 9, 7) == (1, 1)
    assert split_batch(8, 9, 0) == (8, 0)
