"""UpdateSampler and UpdateLoader: updates as loader items, resumable mid-epoch, crops independent of workers."""
import pytest
import torch

from dataset import (BucketizeBatchSampler, CollateFnHubert, DistributedBatchSampler, HuBERTDataSet, UpdateLoader,
                     UpdateSampler)
from tests.fixtures import make_prepared_dataset


def micro_batches(n):
    return [[i] for i in range(n)]


def test_groups_of_accumulate_with_a_shorter_last_one_on_every_rank():
    inner = micro_batches(9)
    for rank in range(2):
        sampler = UpdateSampler(DistributedBatchSampler(inner, num_replicas=2, rank=rank, shuffle=False), 2, rank)
        plans = list(sampler)
        assert [len(p.batches) for p in plans] == [2, 2, 1] and len(sampler) == 3  # 5 micro-batches per rank
        assert [p.position for p in plans] == [0, 1, 2] and {p.rank for p in plans} == {rank}
    with pytest.raises(ValueError, match="accumulate must be at least 1"):
        UpdateSampler(inner, 0)


def test_state_skips_what_was_consumed_in_the_same_epoch_only():
    dist = DistributedBatchSampler(micro_batches(20), num_replicas=1, rank=0, seed=3)
    sampler = UpdateSampler(dist, 2)
    sampler.start_epoch(4)
    full = list(sampler)
    sampler.consumed = 3
    state = sampler.state_dict()
    assert state == {"epoch": 4, "consumed": 3, "layout": {"micro_batches": 20, "accumulate": 2, "num_replicas": 1}}

    resumed = UpdateSampler(DistributedBatchSampler(micro_batches(20), num_replicas=1, rank=0, seed=3), 2)
    resumed.start_epoch(4)
    resumed.load_state_dict(state)
    assert list(resumed) == full[3:]
    assert list(resumed) == full, "the skip applies to the first iteration after loading only"
    resumed.start_epoch(5)
    assert [p.batches for p in resumed] != [p.batches for p in full]  # the next epoch is reshuffled

    other_epoch = UpdateSampler(DistributedBatchSampler(micro_batches(20), num_replicas=1, rank=0, seed=3), 2)
    other_epoch.start_epoch(5)
    other_epoch.load_state_dict(state)  # epoch 4 was finished: epoch 5 starts from its beginning
    assert len(list(other_epoch)) == 10


def test_another_layout_resumes_at_the_same_update_with_a_warning():
    state = {"epoch": 0, "consumed": 4, "layout": {"micro_batches": 20, "accumulate": 2, "num_replicas": 1}}
    sampler = UpdateSampler(DistributedBatchSampler(micro_batches(20), num_replicas=2, rank=0), 1)
    with pytest.warns(UserWarning, match="different data layout"):
        sampler.load_state_dict(state)
    assert [p.position for p in sampler] == list(range(4, 10))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = make_prepared_dataset(tmp_path_factory.mktemp("updates"), n_train=10, n_valid=1)
    return HuBERTDataSet(data, "librispeech", "train", feature_type="mfcc", num_classes=10)


def make_loader(dataset, workers):
    sampler = BucketizeBatchSampler(dataset.len_list, num_buckets=3, max_token_count=8 * 16000, seed=1)
    batches = DistributedBatchSampler(sampler, num_replicas=1, rank=0, seed=1)
    return UpdateLoader(dataset, batches, CollateFnHubert("mfcc", rand_crop=True), accumulate=2, seed=5,
                        num_workers=workers)


def flatten(items):
    return [(item.epoch, item.position, m, t) for item in items for m, mb in enumerate(item.micro_batches) for t in mb]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:3] == y[:3] and torch.equal(x[3], y[3])


def test_crops_do_not_depend_on_workers_and_a_resumed_loader_continues_exactly(dataset):
    """Crop to the shortest utterance of each micro-batch at a random offset: with 0 or 2 workers, and
    after a resume, every tensor is the same; the next epoch re-plans with new crops."""
    loader = make_loader(dataset, 0)
    inline = list(loader)
    assert len(inline) >= 3 and all(len(item.micro_batches) <= 2 for item in inline)
    assert_same(flatten(list(make_loader(dataset, 2))), flatten(inline))

    resumed = make_loader(dataset, 2)
    resumed.load_state_dict({**loader.state_dict(), "consumed": 2})
    assert_same(flatten(list(resumed)), flatten(inline[2:]))

    loader.start_epoch(1)
    assert len(loader) == len(list(loader))
    assert [item.epoch for item in loader] == [1] * len(loader)
    first = inline[0].micro_batches[0][0]
    assert not any(torch.equal(first, item.micro_batches[0][0]) for item in loader)
