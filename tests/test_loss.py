"""Static loss and accuracy equal the dynamic ones; values checked by hand."""
import math

import pytest
import torch

from loss import compute_accuracy, compute_accuracy_static, hubert_loss, hubert_loss_static
from model import hubert_pretrain_model
from tests.numerics import assert_same_math
from tests.test_model import SMALL, make_batch

pytestmark = pytest.mark.numerics  # run again under ATEN_CPU_CAPABILITY=default by make test


@pytest.fixture(scope="module")
def outputs():
    """Dynamic and static outputs of one float64 model on one batch (same seed, so same masks)."""
    dynamic = hubert_pretrain_model(**SMALL, all_deterministic=True).double()
    static = hubert_pretrain_model(**SMALL, all_deterministic=True, static_logit_generator=True,
                                   static_indexing=True, static_layerdrop=True).double()
    static.load_state_dict(dynamic.state_dict())
    batch = make_batch(20, dtype=torch.float64)
    torch.manual_seed(0)
    dyn = dynamic(*batch)
    torch.manual_seed(0)
    return dyn, static(*batch)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("unmasked_weight", [0.0, 0.5])
def test_static_loss_equals_dynamic(outputs, reduction, unmasked_weight):
    (logit_m, logit_u, pen), (logits, mask_m, mask_u, pen_s) = outputs
    expected = hubert_loss(logit_m, logit_u, pen, unmasked_weight=unmasked_weight, reduction=reduction)
    got = hubert_loss_static(logits, mask_m, mask_u, pen_s, unmasked_weight=unmasked_weight, reduction=reduction)
    assert_same_math(got, expected)


def test_static_accuracy_equals_dynamic(outputs):
    (logit_m, logit_u, _), (logits, mask_m, mask_u, _) = outputs
    assert [t.item() for t in compute_accuracy_static(logits, mask_m)] == [t.item() for t in compute_accuracy(logit_m)]
    assert [t.item() for t in compute_accuracy_static(logits, mask_u)] == [t.item() for t in compute_accuracy(logit_u)]


def test_loss_by_hand():
    """Two masked frames, uniform logits over 4 classes: CE = log 4 each; penalty 0.5 * 10 * 2 frames."""
    logit_m = torch.zeros(2, 5)
    logit_m[:, 1] = float("-inf")  # the target's own column, as the model writes it
    loss = hubert_loss(logit_m, None, torch.tensor(0.5))
    assert math.isclose(loss.item(), 0.5 * 10 * 2 + 2 * math.log(4), rel_tol=1e-6)


def test_accuracy_by_hand():
    logits = torch.tensor([
        [2.0, 1.0, 0.0],   # target largest: correct
        [0.0, 1.0, 0.0],   # another class larger: wrong
        [1.0, 1.0, 1.0],   # constant row: argmax == argmin == 0, not counted as correct
        [3.0, -1.0, 3.5],  # wrong
    ])
    correct, count = compute_accuracy(logits)
    assert (correct.item(), count.item()) == (1, 4)
    mask = torch.tensor([[True, False], [True, True]])
    correct, count = compute_accuracy_static(logits, mask)
    assert (correct.item(), count.item()) == (1, 3)
