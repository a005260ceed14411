"""Span masks: same draws as torchaudio, equal counts per row, padding never masked."""
import pytest
import torch
from torchaudio.models.wav2vec2.components import _compute_mask_indices as ta_mask_indices

from model.masking import compute_mask_indices


@pytest.mark.parametrize("mask_type", ["static", "uniform", "normal"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_same_masks_as_torchaudio(mask_type, with_padding):
    lengths = torch.tensor([250, 120, 99, 250, 31])
    padding = torch.arange(250)[None, :] >= lengths[:, None] if with_padding else None
    for seed in range(3):
        torch.manual_seed(seed)
        expected = ta_mask_indices((5, 250), padding, 0.8, 10, mask_type, 2.0, min_masks=2)
        next_ref = torch.rand(1)
        torch.manual_seed(seed)
        got = compute_mask_indices((5, 250), padding, 0.8, 10, mask_type, 2.0, min_masks=2)
        assert torch.equal(got, expected)
        assert torch.equal(torch.rand(1), next_ref), "a different number of random draws"


def test_rows_have_equal_counts_and_skip_padding():
    lengths = torch.tensor([400, 150, 60])
    padding = torch.arange(400)[None, :] >= lengths[:, None]
    torch.manual_seed(0)
    mask = compute_mask_indices((3, 400), padding, 0.8, 10, min_masks=2)
    counts = mask.sum(1)
    assert (counts == counts[0]).all() and counts[0] >= 10
    assert not (mask & padding).any()


def test_short_rows_still_get_min_masks():
    torch.manual_seed(0)
    mask = compute_mask_indices((2, 12), None, 0.8, 10, min_masks=2)
    counts = mask.sum(1)
    assert counts[0] == counts[1] and counts[0] > 0


def test_no_overlap_is_refused_clearly():
    with pytest.raises(ValueError, match="no_overlap"):
        compute_mask_indices((1, 50), None, 0.5, 10, no_overlap=True)
