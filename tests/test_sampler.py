"""BucketizeBatchSampler, BucketAligner and DistributedBatchSampler at their edges."""
import math
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dataset import BucketAligner, BucketizeBatchSampler, DistributedBatchSampler, bucket_boundaries

README = dict(num_buckets=10, min_len=32000, max_len=250000)  # Habana README bucket settings
README_ALIGNED = [53800, 75600, 97400, 119200, 141000, 162801, 184601, 206401, 228201, 250001]  # spec §4.4
BUDGET = 350 * 16000


def random_lengths(n=3000, seed=0):
    return np.random.default_rng(seed).integers(16000, 300000, size=n)


def flat(batches):
    return [i for batch in batches for i in batch]


def test_readme_buckets_give_the_spec_table():
    aligner = BucketizeBatchSampler([32000, 250000], **README, max_token_count=BUDGET).gen_bucket_boundary_fn()
    assert sorted({aligner(n) for n in range(32000, 250001, 97)} | {aligner(250000)}) == README_ALIGNED
    assert bucket_boundaries(**README).dtype == torch.float32


@pytest.mark.parametrize("length, aligned", [
    (32000, 53800), (53799, 53800), (53800, 75600),  # boundary 53799.2: 53800 is already above it
    (140999, 141000), (141000, 162801),  # exactly on the integer boundary 141000.0: goes to the next one
    (162800, 162801), (250000, 250001), (31998, 31999),
])
def test_aligner_takes_the_first_boundary_strictly_above(length, aligned):
    assert BucketAligner(tuple(bucket_boundaries(**README).tolist()))(length) == aligned


def test_aligner_rejects_lengths_past_the_last_boundary():
    with pytest.raises(ValueError, match="250001 is not below the last bucket boundary 250001.0"):
        BucketAligner(tuple(bucket_boundaries(**README).tolist()))(250001)


def test_small_example_by_hand():
    """Sorted (stable): (3,#1) (3,#3) (5,#0) (7,#4) (9,#2); budget 12 packs 3+3+5, then 7, then 9."""
    sampler = BucketizeBatchSampler([5, 3, 9, 3, 7], num_buckets=2, max_token_count=12, shuffle=False)
    assert list(sampler) == [[1, 3, 0], [4], [2]] and len(sampler) == 3
    by_count = BucketizeBatchSampler([5, 3, 9, 3, 7], num_buckets=2, batch_size=2, shuffle=False)
    assert list(by_count) == [[1, 3], [0, 4], [2]]


def test_equal_lengths_keep_dataset_order():
    lengths = np.random.default_rng(0).choice([32000, 40000, 64000], size=2000)
    order = flat(BucketizeBatchSampler(lengths, **README, batch_size=64, shuffle=False))
    assert order == sorted(range(2000), key=lambda i: lengths[i])  # Python's sort is stable


def test_batches_span_bucket_borders():
    # buckets (-1, 5] and (5, 11]: the first batch takes both 5s and one 10 (20 <= 20)
    sampler = BucketizeBatchSampler([10, 5, 10, 5], num_buckets=2, min_len=0, max_len=10, max_token_count=20,
                                    shuffle=False)
    assert list(sampler) == [[1, 3, 0], [2]]


def test_length_filter_is_inclusive():
    lengths = [31999, 32000, 250000, 250001, 100000]
    sampler = BucketizeBatchSampler(lengths, **README, max_token_count=BUDGET)
    assert sorted(flat(sampler)) == [1, 2, 4]


def test_buckets_follow_the_boundaries():
    lengths = [32000, 53799, 53800, 141000, 141001, 250000] + list(random_lengths(500))
    sampler = BucketizeBatchSampler(lengths, **README, max_token_count=BUDGET)
    b = sampler.boundaries.tolist()
    for bucket_id, positions in sampler.buckets.items():
        for n in sampler.lengths[positions.numpy()]:
            assert b[bucket_id - 1] < n <= b[bucket_id]
    bucket_of = {int(sampler.indices[p]): k for k, positions in sampler.buckets.items() for p in positions.tolist()}
    assert bucket_of[3] == 5 and bucket_of[4] == 6  # 141000 sits on boundary 5, 141001 is past it


@pytest.mark.parametrize("align", ["none", "bucket1", "bucket2"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_once_and_budgets_kept(align, shuffle):
    lengths = random_lengths()
    sampler = BucketizeBatchSampler(lengths, **README, max_token_count=2_000_000, shuffle=shuffle, align_buckets=align)
    kept = np.flatnonzero((lengths >= 32000) & (lengths <= 250000))
    assert sorted(flat(sampler)) == kept.tolist()
    aligner = sampler.gen_bucket_boundary_fn()
    cost = aligner if align == "bucket1" else int
    for batch in sampler:
        assert batch and sum(cost(int(lengths[i])) for i in batch) <= 2_000_000
    assert len(sampler) == len(list(sampler))
    if align == "bucket1":  # aligned costs pack fewer samples per batch than raw ones
        assert len(sampler) > len(BucketizeBatchSampler(lengths, **README, max_token_count=2_000_000))


def test_batch_size_mode_and_drop_last():
    lengths = random_lengths(10)
    for align in ["none", "bucket1"]:  # bucket1 used to cost align(1) per sample here, making 1-item batches
        sampler = BucketizeBatchSampler(lengths, num_buckets=3, batch_size=4, align_buckets=align)
        assert [len(b) for b in sampler] == [4, 4, 2]
    assert [len(b) for b in BucketizeBatchSampler(lengths, num_buckets=3, batch_size=4, drop_last=True)] == [4, 4]
    # a full last batch is not a partial one: it is kept
    assert [len(b) for b in BucketizeBatchSampler(lengths[:8], num_buckets=3, batch_size=4, drop_last=True)] == [4, 4]


def test_shuffle_is_seeded_and_stays_within_buckets():
    lengths = random_lengths()
    make = lambda **kw: list(BucketizeBatchSampler(lengths, **README, max_token_count=BUDGET, **kw))
    assert make(seed=3) == make(seed=3)
    assert make(seed=3) != make(seed=4) != make(shuffle=False)
    plain = flat(make(shuffle=False))
    assert all(d >= 0 for d in np.diff(lengths[plain]))  # unshuffled: in length order
    bounds = bucket_boundaries(**README)
    buckets = torch.bucketize(torch.from_numpy(lengths[flat(make(seed=3))]), bounds)
    assert torch.all(buckets[1:] >= buckets[:-1])  # shuffled order still walks the buckets in order
    assert not all(d >= 0 for d in np.diff(lengths[flat(make(seed=3))]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of"):
        BucketizeBatchSampler([10], num_buckets=2)
    with pytest.raises(ValueError, match="exactly one of"):
        BucketizeBatchSampler([10], num_buckets=2, batch_size=1, max_token_count=10)
    with pytest.raises(ValueError, match="max_len=20 exceeds max_token_count=10"):
        BucketizeBatchSampler([10, 20], num_buckets=2, max_token_count=10)
    with pytest.raises(ValueError, match=r"no sample length lies in \[50, 60\]"):
        BucketizeBatchSampler([10, 20], num_buckets=2, min_len=50, max_len=60, batch_size=1)
    with pytest.raises(ValueError, match="min_len <= max_len"):
        BucketizeBatchSampler([10, 20], num_buckets=2, min_len=30, max_len=20, batch_size=1)
    with pytest.raises(ValueError, match="align_buckets must be one of"):
        BucketizeBatchSampler([10], num_buckets=2, batch_size=1, align_buckets="bucket3")
    with pytest.raises(ValueError, match="a sample of 250000 samples as 250001, more than max_token_count=250000"):
        BucketizeBatchSampler([32000, 250000], **README, max_token_count=250000, align_buckets="bucket1")


def test_distributed_pads_only_to_a_multiple_of_the_ranks():
    inner = BucketizeBatchSampler(random_lengths(400), **README, max_token_count=BUDGET)
    for n_batches, world in [(len(inner), 3), (len(inner), 4), (len(inner), 1)]:
        ranks = [DistributedBatchSampler(inner, num_replicas=world, rank=r, seed=5) for r in range(world)]
        per_rank = [list(s) for s in ranks]
        assert all(len(p) == len(s) == math.ceil(n_batches / world) for p, s in zip(per_rank, ranks))
        seen = sorted(map(tuple, flat(per_rank)))
        assert set(seen) == set(map(tuple, inner))  # every batch reaches some rank
        assert len(seen) - n_batches == (-n_batches) % world  # padding: 0 when divisible
    assert len(inner) % 3 != 0 or len(inner) % 4 != 0  # at least one case above padded


def test_distributed_divisible_has_no_duplicates_and_drop_last_trims():
    inner = [[i] for i in range(12)]
    for world in [3, 4, 6]:
        seen = flat(flat(list(DistributedBatchSampler(inner, world, r)) for r in range(world)))
        assert sorted(seen) == list(range(12))
    seen = [list(DistributedBatchSampler(inner[:11], 4, r, drop_last=True)) for r in range(4)]
    assert [len(s) for s in seen] == [2] * 4 and len(set(flat(flat(seen)))) == 8
    assert [len(DistributedBatchSampler(inner[:11], 4, r, drop_last=True)) for r in range(4)] == [2] * 4


def test_distributed_order_follows_seed_and_epoch():
    inner = [[i] for i in range(50)]
    s = DistributedBatchSampler(inner, num_replicas=2, rank=1, seed=7)
    first = list(s)
    assert list(DistributedBatchSampler(inner, num_replicas=2, rank=1, seed=7)) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first
    s.set_epoch(0)
    assert list(s) == first
    assert list(DistributedBatchSampler(inner, num_replicas=2, rank=1, seed=8)) != first
    assert list(DistributedBatchSampler(inner, num_replicas=2, rank=1, shuffle=False)) == inner[1::2]


def test_distributed_fewer_batches_than_ranks():
    seen = [list(DistributedBatchSampler([[0], [1]], num_replicas=5, rank=r, shuffle=False)) for r in range(5)]
    assert seen == [[[0]], [[1]], [[0]], [[1]], [[0]]]


def test_distributed_world_from_torch_distributed(tmp_path):
    inner = [[i] for i in range(5)]
    assert (DistributedBatchSampler(inner).num_replicas, DistributedBatchSampler(inner).rank) == (1, 0)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        DistributedBatchSampler(inner, num_replicas=2, rank=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        s = DistributedBatchSampler(inner, shuffle=False)
        assert (s.num_replicas, s.rank, list(s)) == (1, 0, inner)
    finally:
        dist.destroy_process_group()
    pickle.loads(pickle.dumps(s))


def test_set_epoch_repacks_with_the_epochs_shuffle():
    lengths = random_lengths()
    sampler = BucketizeBatchSampler(lengths, **README, max_token_count=BUDGET, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(flat(second)) == sorted(flat(first))
    assert second == list(BucketizeBatchSampler(lengths, **README, max_token_count=BUDGET, seed=4))  # seed + epoch
    sampler.set_epoch(0)
    assert list(sampler) == first
    fixed = BucketizeBatchSampler(lengths, **README, max_token_count=BUDGET, shuffle=False)
    before = list(fixed)
    fixed.set_epoch(5)
    assert list(fixed) == before


def test_distributed_set_epoch_reaches_the_inner_sampler_and_its_length():
    lengths = random_lengths(400)
    inner = BucketizeBatchSampler(lengths, **README, max_token_count=3 * 16000 * 10, seed=0)
    counts = set()
    s = DistributedBatchSampler(inner, num_replicas=3, rank=2, seed=0)
    for epoch in range(8):
        s.set_epoch(epoch)
        assert inner.epoch == epoch
        assert len(list(s)) == len(s) == math.ceil(len(inner) / 3)
        counts.add(len(inner))
    assert len(counts) > 1, "reshuffled packing changes the batch count: the test must see that"


def reference_batches(lengths, num_buckets, min_len, max_len, budget, batch_size, shuffle, drop_last, align, seed,
                      epoch):
    """The sampler as it was before the batches became arrays (a loop per sample): the arrays must give the same
    batches, so that runs and their checkpoints carry over."""
    lengths = np.asarray(lengths)
    kept = np.flatnonzero((lengths >= min_len) & (lengths <= max_len))
    order = kept[np.argsort(lengths[kept], kind="stable")]
    boundaries = bucket_boundaries(num_buckets, min_len, max_len)
    align_fn = BucketAligner(tuple(boundaries.tolist()))
    costs = ([1] * len(order) if batch_size else
             [align_fn(int(n)) if align == "bucket1" else int(n) for n in lengths[order]])
    ids = torch.bucketize(torch.from_numpy(lengths[order]), boundaries)
    generator = torch.Generator().manual_seed(seed + epoch)
    batches, batch, total, limit = [], [], 0, batch_size or budget
    for bucket in torch.unique_consecutive(ids).tolist():
        positions = torch.nonzero(ids == bucket).flatten()
        if shuffle:
            positions = positions[torch.randperm(len(positions), generator=generator)]
        for pos in positions.tolist():
            if batch and total + costs[pos] > limit:
                batches.append(batch)
                batch, total = [], 0
            batch.append(int(order[pos]))
            total += costs[pos]
    if not batch_size or not drop_last or len(batch) == batch_size:
        batches.append(batch)
    return batches


@pytest.mark.parametrize("align", ["none", "bucket1", "bucket2"])
@pytest.mark.parametrize("batch_size, drop_last", [(None, False), (7, False), (7, True)])
def test_same_batches_as_the_per_sample_loop(align, batch_size, drop_last):
    lengths = random_lengths(5000, seed=3)
    budget = None if batch_size else BUDGET
    for shuffle in (False, True):
        sampler = BucketizeBatchSampler(lengths, **README, max_token_count=budget, batch_size=batch_size,
                                        shuffle=shuffle, drop_last=drop_last, align_buckets=align, seed=11)
        for epoch in (0, 1, 2):
            sampler.set_epoch(epoch)
            want = reference_batches(lengths, **README, budget=budget, batch_size=batch_size, shuffle=shuffle,
                                     drop_last=drop_last, align=align, seed=11, epoch=epoch)
            assert list(sampler) == want and [sampler[i] for i in range(len(sampler))] == want
            for world in (1, 3):
                for rank in range(world):
                    generator = torch.Generator().manual_seed(5 + epoch)
                    dealt = [want[i] for i in torch.randperm(len(want), generator=generator).tolist()]
                    dealt += dealt[:-len(dealt) % world]  # pad to a multiple of world (upstream added a round more)
                    dist_sampler = DistributedBatchSampler(sampler, world, rank, seed=5)
                    dist_sampler.set_epoch(epoch)
                    assert list(dist_sampler) == dealt[rank::world]
