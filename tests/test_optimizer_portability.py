"""A checkpoint resumes across torch's AdamW and Habana's FusedAdamW (--optimizer fusedadamw --hpus): their
optimizer states keep the step count in different places. No Gaudi here: a stand-in with FusedAdamW's state
layout and torch AdamW's arithmetic trains the --optimizer fusedadamw runs."""
import pytest
import torch
from torch.optim.adamw import adamw

import lightning
import train
from tests.fixtures import make_prepared_dataset
from tests.test_train import args_for
from utils.checkpoint import load_checkpoint
from utils.device import make_optimizer, portable_optimizer_state

CKPTS = "checkpoints_librispeech_hubert_pretrain_tiny"


class HabanaLayoutAdamW(torch.optim.Optimizer):
    """FusedAdamW's layout (habana_frameworks.torch.hpex.optimizers): the step count ``step`` and ``correct_bias``
    in each param group, ``step`` left at 0 in each parameter's state; the update is torch's AdamW function."""

    def __init__(self, params, lr, betas, eps, weight_decay, correct_bias=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            beta1, beta2 = group["betas"]
            adamw(  # it counts the step tensors up by one before using them
                params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params], [],
                [torch.tensor(float(group["step"] - 1)) for _ in params], foreach=False, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=False)


def habana_on_fusedadamw(name, params, lr, betas, eps, weight_decay, device_type):
    if name == "fusedadamw":
        return HabanaLayoutAdamW(params, lr, betas, eps, weight_decay)
    return make_optimizer(name, params, lr, betas, eps, weight_decay, device_type)


@pytest.mark.numerics
def test_a_checkpoint_resumes_across_adamw_and_fusedadamw_exactly(tmp_path, monkeypatch):
    """6 updates with AdamW == 6 with the stand-in == 3 with either, resumed with the other, bit for bit
    (without layer drop: with it the two differ by design, FusedAdamW's one step count per group also counting
    the updates in which a parameter had no gradient)."""
    monkeypatch.setattr(lightning, "make_optimizer", habana_on_fusedadamw)
    data = make_prepared_dataset(tmp_path / "d", n_train=8, n_valid=2)
    common = ["--max-updates", "6", "--warmup-updates", "2", "--seconds-per-batch", "16", "--val-check-interval", "3",
              "--precision", "fp32", "--no-layerdrop"]  # FusedAdamW counts a dropped layer's steps too
    for optimizer in ("adamw", "fusedadamw"):
        train.main(args_for(data, tmp_path / optimizer, *common, "--optimizer", optimizer))
    at_3 = {name: next((tmp_path / name / CKPTS).glob("epoch=*-step=3.ckpt")) for name in ("adamw", "fusedadamw")}
    habana = load_checkpoint(at_3["fusedadamw"])["optimizer_states"][0]
    assert habana["param_groups"][0]["step"] == 3 and habana["param_groups"][0]["correct_bias"]
    assert {entry["step"] for entry in habana["state"].values()} == {0}
    reference = load_checkpoint(tmp_path / "adamw" / CKPTS / "last.ckpt")["state_dict"]
    for first, then in (("fusedadamw", "adamw"), ("adamw", "fusedadamw")):
        train.main(args_for(data, tmp_path / f"{first}_{then}", *common, "--optimizer", then,
                            "--resume-checkpoint", str(at_3[first])))
    for run in ("fusedadamw", "fusedadamw_adamw", "adamw_fusedadamw"):
        final = load_checkpoint(tmp_path / run / CKPTS / "last.ckpt")
        assert final["global_step"] == 6
        for key, value in reference.items():
            assert torch.equal(final["state_dict"][key], value), (run, key)


def test_fusedadamw_without_bias_correction_does_not_resume_with_adamw():
    param = torch.nn.Parameter(torch.ones(3))
    habana = HabanaLayoutAdamW([param], 0.1, (0.9, 0.98), 1e-6, 0.01, correct_bias=False)
    param.grad = torch.ones(3)
    habana.step()
    with pytest.raises(ValueError, match="without bias correction .* resume it with --optimizer fusedadamw"):
        portable_optimizer_state(habana.state_dict(), torch.optim.AdamW([param]))
    assert portable_optimizer_state(habana.state_dict(), habana)["param_groups"][0]["step"] == 1
