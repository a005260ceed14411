"""The one-matmul logits equal torchaudio's expanded cosine-similarity logits."""
import pytest
import torch
from torchaudio.models.wav2vec2.components import _compute_logits as ta_compute_logits

from model.logits import LOGIT_TEMP, compute_logits
from tests.numerics import assert_fp32_close, assert_same_math

pytestmark = pytest.mark.numerics  # run again under ATEN_CPU_CAPABILITY=default by make test


@pytest.mark.parametrize("num_classes", [1, 7, 100, 500, 501])
@pytest.mark.parametrize("split_logits", [False, True])
def test_logits_match_torchaudio(num_classes, split_logits):
    g = torch.Generator().manual_seed(num_classes)
    proj_x = torch.randn(64, 16, generator=g)
    target = torch.randint(0, num_classes, (64,), generator=g)
    emb = torch.rand(num_classes, 16, generator=g)
    expected = ta_compute_logits(proj_x, target, emb)
    got = compute_logits(proj_x, target, emb, split_logits=split_logits)
    assert got.shape == (64, num_classes + 1)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    # Both fp32 by design (upstream's .float()), by different kernels: cosine rounding on the 1 / LOGIT_TEMP scale.
    assert_fp32_close(got[finite], expected[finite], scale=1 / LOGIT_TEMP)
    # The target's own column is -inf and column 0 holds its score.
    assert torch.isinf(got[torch.arange(64), target + 1]).all()
    # A float64 model's logits stay float64 math (upstream would round them to fp32): the cosines exactly.
    x64, emb64 = proj_x.double(), emb.double()
    got64 = compute_logits(x64, target, emb64, split_logits=split_logits)
    candidates = torch.cat([emb64[target][:, None], emb64[None].expand(64, -1, -1)], dim=1)  # target, then all
    cosines = torch.cosine_similarity(x64[:, None, :], candidates, dim=-1) / LOGIT_TEMP
    assert_same_math(got64[finite], cosines[finite])


def test_duplicate_label_embeddings_are_all_excluded():
    """Classes whose embedding equals the target's are -inf too, as upstream's (pos == negs).all(-1)."""
    emb = torch.rand(6, 4)
    emb[4] = emb[1]
    proj_x = torch.randn(3, 4)
    target = torch.tensor([1, 4, 2])
    got = compute_logits(proj_x, target, emb)
    expected = ta_compute_logits(proj_x, target, emb)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.isinf(got[0, [2, 5]]).all() and torch.isinf(got[1, [2, 5]]).all()
    assert torch.isinf(got[2]).sum() == 1


def test_logits_stay_fp32_under_autocast():
    """bf16 frames in, fp32 logits out, exactly the fp32 computation (upstream rounded them to bf16: steps of
    0.0625 near 10, and ties that count as correct)."""
    proj_x = torch.randn(8, 16)
    emb = torch.rand(10, 16)
    target = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute_logits(proj_x.bfloat16(), target, emb)
    assert got.dtype == torch.float32
    assert torch.equal(got, compute_logits(proj_x.bfloat16().float(), target, emb))
    assert not torch.equal(got, got.bfloat16().float())  # what rounding to bf16 would have changed


def test_gradients_match_torchaudio():
    proj_x = torch.randn(32, 8, requires_grad=True)
    emb = torch.rand(5, 8, requires_grad=True)
    target = torch.randint(0, 5, (32,))
    grads = []
    for fn in (ta_compute_logits, compute_logits):
        logits = fn(proj_x, target, emb)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(32, dtype=torch.long))
        grads.append(torch.autograd.grad(loss, (proj_x, emb)))
    for a, b in zip(*grads):
        assert_fp32_close(a, b)
