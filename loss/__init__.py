from .accuracy import compute_accuracy, compute_accuracy_static
from .hubert_loss import hubert_loss, hubert_loss_static

__all__ = ["compute_accuracy", "compute_accuracy_static", "hubert_loss", "hubert_loss_static"]
