"""The one place that knows about devices. Habana and CUDA specifics are imported lazily, so CPU always
works and nothing device-specific is needed to import the project."""
import torch


def mark_step(x: torch.Tensor) -> None:
    """End the current lazy graph on HPU (``htcore.mark_step``); nothing on other devices."""
    if x.device.type == "hpu":
        import habana_frameworks.torch.core as htcore

        htcore.mark_step()
