"""Faults: runs killed with SIGKILL and re-run, and bad files that must give clear errors naming them."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from tests.fixtures import make_prepared_dataset
from tests.test_common_utils import make_corpus
from tests.test_preprocess import files_of
from utils.checkpoint import load_checkpoint
from utils.feature_shards import load_shard

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_until(cmd, ready, timeout=300):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; fail if it finished first."""
    with subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
                assert time.monotonic() < deadline, "never reached the point to kill it"
                time.sleep(0.02)
        finally:
            proc.kill()  # SIGKILL; nothing if it has finished
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def train_cmd(data, exp, updates, *extra):
    return [sys.executable, "train.py", "--dataset-path", str(data), "--exp-dir", str(exp), "--feature-type", "mfcc",
            "--num-classes", "10", "--model-name", "hubert_pretrain_tiny", "--max-updates", str(updates),
            "--warmup-updates", "2", "--seconds-per-batch", "16", *extra]


def test_training_killed_after_a_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    """Dropout, masks, layer drop and random crops on; 2 micro-batches per update, 2 loader workers. A run
    SIGKILLed after its mid-epoch checkpoint at update 3, resumed from it, ends with the weights of an
    uninterrupted run, bit for bit: the loader skips exactly the updates the checkpoint had trained on."""
    data = make_prepared_dataset(tmp_path / "d", n_train=48)
    flags = ["--accumulate-grad-batches", "2", "--num-workers", "2", "--val-check-interval", "3"]
    ckpts = tmp_path / "killed" / "checkpoints_librispeech_hubert_pretrain_tiny"
    mid = ckpts / "epoch=0-step=3.ckpt"
    run_until(train_cmd(data, tmp_path / "killed", 6, *flags), lambda: mid.exists() and (ckpts / "last.ckpt").exists())
    loader = load_checkpoint(mid)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["epoch"] == 0 and loader["consumed"] == 3
    assert loader["layout"]["micro_batches"] > 2 * 3, "the checkpoint must be mid-epoch"
    resumed = subprocess.run(train_cmd(data, tmp_path / "killed", 6, *flags, "--resume-checkpoint", str(mid)),
                             cwd=REPO, env=ENV, check=True, capture_output=True, text=True)
    assert "not resumable" not in resumed.stderr
    subprocess.run(train_cmd(data, tmp_path / "straight", 6, *flags), cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    killed = load_checkpoint(ckpts / "last.ckpt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints_librispeech_hubert_pretrain_tiny" / "last.ckpt")
    assert killed["global_step"] == straight["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(killed["state_dict"][key], value), key


def test_preprocess_killed_and_rerun_gives_the_same_files(tmp_path):
    root = tmp_path / "corpus"
    make_corpus(root)
    args = ["--root-dir", str(root), "--feat-type", "mfcc", "--num-cluster", "4", "--num-rank", "4",
            "--valid-percent", "0.2"]
    cmd = [sys.executable, "preprocess.py", *args, "--exp-dir", str(tmp_path / "killed")]
    feat = tmp_path / "killed" / "data" / "mfcc" / "feat"
    run_until(cmd, lambda: len(list(feat.glob("*.done"))) >= 1)
    # Every file under a final name is complete: a shard's files load and agree with each other.
    for done in feat.glob("*.done"):
        split, rank, num_rank = done.stem.split("_")
        load_shard(feat, split, int(rank), int(num_rank))  # checks rows against lengths and the header
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True)
    subprocess.run([*cmd[:-1], str(tmp_path / "straight")], cwd=REPO, env=ENV, check=True, capture_output=True)

    killed, straight = (files_of(tmp_path / run / "data" / "mfcc") for run in ("killed", "straight"))
    assert killed.keys() == straight.keys() and killed == straight
    assert not [name for name in killed if name.startswith(".") or "/." in name], "temp files left behind"


def test_truncated_checkpoint_is_named_by_train_and_preprocess(tmp_path):
    data = make_prepared_dataset(tmp_path / "d", n_train=3, n_valid=1)
    bad = tmp_path / "epoch=3-step=9.ckpt"
    good = hubert_checkpoint_bytes()
    bad.write_bytes(good[: len(good) // 3])
    with pytest.raises(SystemExit, match="epoch=3-step=9.ckpt is truncated or not a PyTorch checkpoint"):
        train.main(["--dataset-path", str(data), "--feature-type", "mfcc", "--num-classes", "10",
                    "--exp-dir", str(tmp_path / "exp"), "--resume-checkpoint", str(bad)])
    done = subprocess.run([sys.executable, "preprocess.py", "--root-dir", str(tmp_path / "d" / "audio"),
                           "--exp-dir", str(tmp_path / "p"), "--feat-type", "hubert", "--checkpoint-path", str(bad)],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode != 0 and "epoch=3-step=9.ckpt is truncated or not a PyTorch checkpoint" in done.stderr


def hubert_checkpoint_bytes() -> bytes:
    import io

    from model import hubert_pretrain_tiny

    buffer = io.BytesIO()
    torch.save({"state_dict": {f"model.{k}": v for k, v in hubert_pretrain_tiny().state_dict().items()}}, buffer)
    return buffer.getvalue()


def test_label_file_missing_a_line_is_named(tmp_path):
    data = make_prepared_dataset(tmp_path / "d", n_train=4, n_valid=2)
    labels = data / "label" / "label_train.pt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"label_train.pt: has 3 label lines but .*librispeech_train.tsv lists 4"):
        train.main(["--dataset-path", str(data), "--feature-type", "mfcc", "--num-classes", "10",
                    "--exp-dir", str(tmp_path / "exp"), "--model-name", "hubert_pretrain_tiny",
                    "--num-workers", "0", "--max-updates", "2", "--warmup-updates", "1",
                    "--seconds-per-batch", "16"])


def test_tsv_pointing_at_a_missing_file_is_named(tmp_path):
    data = make_prepared_dataset(tmp_path / "d", n_train=4, n_valid=2)
    missing = tmp_path / "d" / "audio" / "train-clean-100" / "1" / "2" / "1-2-train0002.flac"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="librispeech_train.tsv: 1 listed audio file.*1-2-train0002.flac"):
        train.main(["--dataset-path", str(data), "--feature-type", "mfcc", "--num-classes", "10",
                    "--exp-dir", str(tmp_path / "exp"), "--model-name", "hubert_pretrain_tiny",
                    "--num-workers", "0", "--max-updates", "2", "--warmup-updates", "1",
                    "--seconds-per-batch", "16"])
