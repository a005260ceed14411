"""loader_stats, computed from lengths, agrees with what the real collate builds."""
from collections import Counter

import numpy as np
import pytest
import torch

from dataset import (BucketizeBatchSampler, CollateFnHubert, DistributedBatchSampler, expected_num_labels,
                     format_stats, loader_stats)


def test_small_example_by_hand():
    lengths = [1000, 2000, 3000]
    crop = loader_stats([[0, 1], [2]], lengths)
    assert crop.num_batches == 2 and crop.shapes == {(2, 1000): 1, (1, 3000): 1}
    assert (crop.collated_samples, crop.audio_samples, crop.cropped_samples) == (5000, 5000, 1000)
    assert crop.padding_fraction == 0 and crop.cropped_fraction == pytest.approx(1000 / 6000)
    pad = loader_stats([[0, 1], [2]], lengths, pad=True)
    assert pad.shapes == {(2, 2000): 1, (1, 3000): 1} and pad.padding_fraction == pytest.approx(1000 / 7000)
    aligned = loader_stats([[0, 1], [2]], lengths, pad=True, aligner=lambda n: 4000)
    assert aligned.shapes == {(2, 4000): 1, (1, 4000): 1} and aligned.padding_fraction == pytest.approx(6000 / 12000)
    assert aligned.cropped_fraction == 0


@pytest.mark.parametrize("align", ["none", "bucket1", "bucket2"])
def test_matches_the_collated_batches(align):
    lengths = np.random.default_rng(0).integers(400, 8000, size=300)
    sampler = BucketizeBatchSampler(lengths, num_buckets=4, min_len=1000, max_len=7000, max_token_count=30000,
                                    shuffle=True, align_buckets=align)
    pad = align != "none"
    aligner = sampler.gen_bucket_boundary_fn() if pad else None
    collate = CollateFnHubert("hubert", pad=pad, aligner=aligner)
    shapes, collated, audio = Counter(), 0, 0
    for batch in sampler:
        items = [(torch.ones(1, int(lengths[i])), torch.zeros(expected_num_labels(int(lengths[i]), "hubert"),
                                                              dtype=torch.int64), int(lengths[i])) for i in batch]
        waveforms, _, lens = collate(items)
        shapes[tuple(waveforms.shape)] += 1
        collated += waveforms.numel()
        audio += int(waveforms.sum())  # ones where there is audio, zeros where padded
        assert lens.sum().item() == int(waveforms.sum())
    stats = loader_stats(sampler, lengths, pad=pad, aligner=aligner)
    assert stats.shapes == dict(shapes) and stats.num_batches == len(sampler)
    assert (stats.collated_samples, stats.audio_samples) == (collated, audio)
    assert stats.padding_fraction == pytest.approx(1 - audio / collated)
    assert (stats.padding_fraction > 0) == pad and (stats.cropped_fraction > 0) == (not pad)
    if align != "none":
        assert len({t for _, t in stats.shapes}) <= 4  # at most one padded length per bucket


def test_works_on_a_distributed_sampler_and_formats():
    lengths = np.random.default_rng(1).integers(1000, 5000, size=100)
    inner = BucketizeBatchSampler(lengths, num_buckets=3, batch_size=8)
    ranks = [loader_stats(DistributedBatchSampler(inner, num_replicas=2, rank=r), lengths) for r in range(2)]
    assert [s.num_batches for s in ranks] == [7, 7]
    text = format_stats(ranks[0], top=2)
    shapes = list(ranks[0].shapes.items())
    assert text.splitlines()[0] == f"batches: 7, distinct (batch_size, seq_len) shapes: {len(shapes)}, " \
                                   f"distinct seq_len: {len({t for (_, t), _ in shapes})}"
    (bs, t), count = shapes[0]
    assert text.splitlines()[3].split() == [str(count), str(bs), str(t)]
    assert text.splitlines()[-1] == f"... {len(shapes) - 2} more shapes"
    assert "padding: 0.00%" in text
