"""Learning-rate schedule of HuBERT pre-training (spec §8.2)."""
import torch


class LinearDecayLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up to the peak over ``warmup_updates``, then linear decay to 0 at ``max_updates``.

    Stepped once per optimizer update; update k (1-based) uses ``base * k / W`` while k <= W (never 0 at
    the first step, as upstream), then ``base * (M - k) / (M - W)``, and 0 from k = M on.
    """

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
