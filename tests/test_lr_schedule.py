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


@pytest.mark.parametrize("make", [lambda opt, end: LinearDecayLRScheduler(opt, 2, end),
                                  lambda opt, end: TriStageLRScheduler(opt, 2, 1, end - 3)],
                         ids=["linear", "tri_stage"])
def test_a_resumed_schedule_takes_its_stage_lengths_from_the_new_run(make):
    """Extending a finished run (--max-updates 6 -> 10): the update count comes from the checkpoint, the schedule
    from the new flags, and the next update's LR is the new schedule's (the optimizer's restored one was 0)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    short = make(opt, 6)
    for _ in range(6):
        opt.step()
        short.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.load_state_dict({**opt.state_dict(), "param_groups": [{**opt.param_groups[0], "lr": 0.0}]})
    extended = make(opt, 10)
    extended.load_state_dict(short.state_dict())
    planned_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    planned = make(planned_opt, 10)
    for _ in range(6):
        planned_opt.step()
        planned.step()
    assert opt.param_groups[0]["lr"] == planned_opt.param_groups[0]["lr"] > 0
    assert extended.state_dict() == planned.state_dict()


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
