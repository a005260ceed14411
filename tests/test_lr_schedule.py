"""The schedule of spec §8.2: base*k/W during warm-up (k = 1-based update), linear decay to 0 at M."""
import pytest
import torch

from utils.lr_schedule import LinearDecayLRScheduler, TriStageLRScheduler


def lrs(warmup, max_updates, steps, base=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = LinearDecayLRScheduler(opt, warmup, max_updates)
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])  # the lr this update uses
        opt.step()
        sched.step()
    return used, sched


def test_warmup_decay_and_zero():
    used, _ = lrs(4, 10, 12, base=2.0)
    assert used == pytest.approx([0.5, 1.0, 1.5, 2.0, 2 * 5 / 6, 2 * 4 / 6, 2 * 3 / 6, 2 * 2 / 6, 2 * 1 / 6, 0, 0, 0])


def test_state_round_trip_resumes_the_schedule():
    used, sched = lrs(4, 10, 6)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = LinearDecayLRScheduler(opt, 4, 10)
    resumed.load_state_dict(sched.state_dict())
    opt.param_groups[0]["lr"] = sched.get_last_lr()[0]
    full, _ = lrs(4, 10, 8)
    assert opt.param_groups[0]["lr"] == pytest.approx(full[6])


def test_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_updates"):
        LinearDecayLRScheduler(opt, 10, 10)


def test_tri_stage_warmup_hold_decay_and_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = TriStageLRScheduler(opt, warmup_updates=4, hold_updates=2, decay_updates=3)
    used = []
    for _ in range(11):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warmup = [2.0 * (0.01 + k / 4 * 0.99) for k in (1, 2, 3, 4)]
    decay = [2.0 * 0.05 ** (k / 3) for k in (1, 2, 3)]
    assert used == pytest.approx(warmup + [2.0, 2.0] + decay + [0.1, 0.1])
    with pytest.raises(ValueError, match="warmup_updates >= 1"):
        TriStageLRScheduler(opt, 0, 1, 1)
