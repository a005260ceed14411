"""utils/loggers.py through train.py's real Trainer: one version folder per run for TensorBoard and CSV, no
false "will be deleted" warning, no advertisement (and utils.callbacks.UpdateProgressBar: no "Epoch 0/-2")."""
import logging
import re
import warnings

import train
from tests.fixtures import make_prepared_dataset
from tests.test_train import args_for
from utils.callbacks import RICH


def test_each_run_logs_to_a_new_version_folder_without_false_warnings(tmp_path, caplog, capsys):
    data = make_prepared_dataset(tmp_path / "data", n_train=4, n_valid=1)
    exp = tmp_path / "exp"
    common = ["--max-updates", "4", "--warmup-updates", "1", "--seconds-per-batch", "16", "--val-check-interval", "2"]
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train.main(args_for(data, exp, *common))
        first = exp / "lightning_logs" / "version_0"
        before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
        ckpt = next(exp.glob("checkpoints_*/epoch=*-step=2.ckpt"))
        train.main(args_for(data, exp, *common, "--resume-checkpoint", str(ckpt)))
    said = [str(w.message) for w in seen] + [r.getMessage() for r in caplog.records]
    printed = capsys.readouterr().out
    bar = r"Epoch \d+ +━" if RICH else r"Epoch \d+: "  # Lightning's tqdm bar where rich does not fit it
    assert re.search(bar, printed) and "/-2" not in printed  # was "Epoch 3/-2": no last epoch
    assert not [m for m in said if "will be deleted" in m or "Tip:" in m or "litlogger" in m], said
    assert sorted(p.name for p in (exp / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    for version in ("version_0", "version_1"):
        names = [p.name for p in (exp / "lightning_logs" / version).iterdir()]
        assert "metrics.csv" in names and any(n.startswith("events.out.tfevents") for n in names), names
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before  # the first run's logs kept
    assert "train_loss_step" in (first / "metrics.csv").read_text()
