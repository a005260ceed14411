"""The loggers of train.py and finetune.py: TensorBoard and CSV in one version folder per run, quietly."""
import logging
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

# Lightning's rank-zero messages go through whichever of these its import set last.
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class DropTips(logging.Filter):
    """Lightning 2.6 advertises litlogger and litmodels ("💡 Tip: ...") at every Trainer start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


DROP_TIPS = DropTips()


def run_loggers(exp_dir: Path) -> list:
    """``<exp_dir>/lightning_logs/version_N/``, a new N for every run (a resumed run too), with TensorBoard's
    events and ``metrics.csv``. The CSV writer is made first, while the folder does not exist yet: made after
    TensorBoard's events file it warns that "previous log files in this directory will be deleted", which
    they are not (it would delete only a ``metrics.csv``, and the folder is new)."""
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(DROP_TIPS)  # the same object each time: added once
    tensorboard = TensorBoardLogger(exp_dir, name="lightning_logs")
    csv = CSVLogger(exp_dir, name="lightning_logs", version=tensorboard.version)
    csv.experiment  # noqa: B018 (creates the folder on rank 0; a stand-in elsewhere)
    return [tensorboard, csv]
