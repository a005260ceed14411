"""Learning-rate schedules: HuBERT pre-training (spec §8.2) and CTC fine-tuning (spec §11.1)."""
import math

import torch


class FlagsSchedule(torch.optim.lr_scheduler.LRScheduler):
    """A resumed run keeps its position (the update count) but takes the stage lengths from its own flags: a
    finished run extended with a larger ``--max-updates`` decays to the new end from where it stopped.
    torch's ``state_dict`` saves every attribute, so a plain ``load_state_dict`` would bring back the old ones,
    and the restored optimizer holds the old schedule's LR for the next update: it is set anew."""

    FROM_FLAGS: tuple = ()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self.FROM_FLAGS})
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class LinearDecayLRScheduler(FlagsSchedule):
    """Linear warm-up to the peak over ``warmup_updates``, then linear decay to 0 at ``max_updates``.

    Stepped once per optimizer update; update k (1-based) uses ``base * k / W`` while k <= W (never 0 at
    the first step, as upstream), then ``base * (M - k) / (M - W)``, and 0 from k = M on.
    """

    FROM_FLAGS = ("warmup_updates", "max_updates")

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_updates: int, max_updates: int, last_epoch=-1):
        if not 0 < warmup_updates < max_updates:
            raise ValueError(f"need 0 < warmup_updates ({warmup_updates}) < max_updates ({max_updates})")
        self.warmup_updates = warmup_updates
        self.max_updates = max_updates
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        k = self._step_count
        if k <= self.warmup_updates:
            scale = k / self.warmup_updates
        elif k < self.max_updates:
            scale = (self.max_updates - k) / (self.max_updates - self.warmup_updates)
        else:
            scale = 0.0
        return [base * scale for base in self.base_lrs]


class TriStageLRScheduler(FlagsSchedule):
    """Fine-tuning schedule (spec §11.1): warm-up from ``init_lr_scale * base`` to base over W updates, hold
    base for H, decay exponentially to ``final_lr_scale * base`` over D, then stay there.

    Update k (1-based) uses ``base * (s0 + k / W * (1 - s0))`` while k <= W, ``base`` while k <= W + H,
    ``base * exp(ln(s1) * (k - W - H) / D)`` while k <= W + H + D, then ``base * s1``.
    """

    FROM_FLAGS = ("warmup_updates", "hold_updates", "decay_updates", "init_lr_scale", "final_lr_scale")

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_updates: int, hold_updates: int,
                 decay_updates: int, init_lr_scale: float = 0.01, final_lr_scale: float = 0.05, last_epoch=-1):
        if warmup_updates < 1 or hold_updates < 0 or decay_updates < 1:
            raise ValueError(f"need warmup_updates >= 1, hold_updates >= 0, decay_updates >= 1, got "
                             f"{warmup_updates}, {hold_updates}, {decay_updates}")
        self.warmup_updates = warmup_updates
        self.hold_updates = hold_updates
        self.decay_updates = decay_updates
        self.init_lr_scale = init_lr_scale
        self.final_lr_scale = final_lr_scale
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        k, w, h, d = self._step_count, self.warmup_updates, self.hold_updates, self.decay_updates
        if k <= w:
            scale = self.init_lr_scale + k / w * (1 - self.init_lr_scale)
        elif k <= w + h:
            scale = 1.0
        elif k <= w + h + d:
            scale = math.exp(math.log(self.final_lr_scale) * (k - w - h) / d)
        else:
            scale = self.final_lr_scale
        return [base * scale for base in self.base_lrs]
