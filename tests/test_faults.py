"""Faults: runs killed with SIGKILL and re-run, runs stopped by a signal and relaunched, and bad files that must give
clear errors naming them."""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from bench.fault_campaign import children, rank_of
from bench.slurm_cluster import SlurmCluster
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
    SIGKILLed after its mid-epoch checkpoint at update 3, relaunched with the same command (it resumes from its
    last.ckpt), ends with the weights of an uninterrupted run, bit for bit: the loader skips exactly the updates
    the checkpoint had trained on. Relaunched once more, the finished run says so and stays as it is."""
    data = make_prepared_dataset(tmp_path / "d", n_train=48)
    flags = ["--accumulate-grad-batches", "2", "--num-workers", "2", "--val-check-interval", "3"]
    ckpts = tmp_path / "killed" / "checkpoints_librispeech_hubert_pretrain_tiny"
    mid = ckpts / "epoch=0-step=3.ckpt"
    run_until(train_cmd(data, tmp_path / "killed", 6, *flags), lambda: mid.exists() and (ckpts / "last.ckpt").exists())
    loader = load_checkpoint(mid)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["epoch"] == 0 and loader["consumed"] == 3
    assert loader["layout"]["micro_batches"] > 2 * 3, "the checkpoint must be mid-epoch"
    resumed = subprocess.run(train_cmd(data, tmp_path / "killed", 6, *flags), cwd=REPO, env=ENV, check=True,
                             capture_output=True, text=True)
    assert "not resumable" not in resumed.stderr and "Restoring states from the checkpoint path" in resumed.stderr
    subprocess.run(train_cmd(data, tmp_path / "straight", 6, *flags), cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    killed = load_checkpoint(ckpts / "last.ckpt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints_librispeech_hubert_pretrain_tiny" / "last.ckpt")
    assert killed["global_step"] == straight["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(killed["state_dict"][key], value), key
    final = (ckpts / "last.ckpt").resolve()
    again = subprocess.run(train_cmd(data, tmp_path / "killed", 6, *flags), cwd=REPO, env=ENV, check=True,
                           capture_output=True, text=True)
    assert "the run is already done" in again.stdout and (ckpts / "last.ckpt").resolve() == final


SIGNAL_FLAGS = ["--accumulate-grad-batches", "2", "--num-workers", "2", "--val-check-interval", "3",
                "--log-every-n-steps", "1"]
CKPTS = "checkpoints_librispeech_hubert_pretrain_tiny"


def val_losses(exp: Path) -> dict:
    """{step: val_loss} over every run (metrics.csv of each lightning_logs/version_N)."""
    found = {}
    for log in sorted(exp.glob("lightning_logs/version_*/metrics.csv")):
        with open(log) as f:
            found.update({int(r["step"]): r["val_loss"] for r in csv.DictReader(f) if r.get("val_loss")})
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(data, exp folder) of a 9-update run with validation every 3 updates, 2 loader workers."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = make_prepared_dataset(root / "d", n_train=48)
    subprocess.run(train_cmd(data, root / "exp", 9, *SIGNAL_FLAGS), cwd=REPO, env=ENV, check=True,
                   capture_output=True)
    return data, root / "exp"


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_stops_after_the_update_and_the_same_command_continues_exactly(uninterrupted, tmp_path, signum):
    """SIGUSR1 (SLURM's preemption warning) or SIGTERM (scancel), sent to every process of the run, loader
    workers too, as SLURM signals a job step: the main process finishes the update in hand, writes one
    checkpoint and exits with 128 + the signal. The same command then continues: the final weights, the
    checkpoints kept and the validation steps and losses are an uninterrupted run's."""
    data, straight = uninterrupted
    exp = tmp_path / "exp"
    cmd = train_cmd(data, exp, 9, *SIGNAL_FLAGS)
    with subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        deadline = time.monotonic() + 300
        while not (exp / CKPTS / "epoch=0-step=3.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at update 3"
            time.sleep(0.02)
        os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    stopped = load_checkpoint(exp / CKPTS / "last.ckpt")["global_step"]
    assert f"stopped by {signal.Signals(signum).name} after update {stopped}, checkpoint written" in stderr
    assert 3 <= stopped < 9 and "killed by signal" not in stderr and not list(exp.rglob("hpc_ckpt*"))
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True)
    resumed, reference = (load_checkpoint(e / CKPTS / "last.ckpt") for e in (exp, straight))
    assert resumed["global_step"] == reference["global_step"] == 9
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert sorted(p.name for p in (exp / CKPTS).iterdir()) == sorted(p.name for p in (straight / CKPTS).iterdir())
    assert val_losses(exp) == val_losses(straight)


def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_update(uninterrupted, tmp_path):
    """2 gloo ranks under torchrun, SIGTERM to rank 1's process only: both ranks stop after the same update (they
    agree after every update) and write one checkpoint there; relaunched, the run finishes. Lightning's own
    handler broadcast from inside the signal handler: a job with one signalled rank hung."""
    data, _ = uninterrupted
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
           *train_cmd(data, exp, 9, *SIGNAL_FLAGS, "--accelerator", "cpu", "--devices", "2")[1:]]
    with subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        deadline = time.monotonic() + 300
        while not (exp / CKPTS / "last.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.02)
        os.kill(next(p for p in children(proc.pid) if rank_of(p) == 1), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    stopped = re.findall(r"stopped by SIGTERM after update (\d+)", stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]
    assert load_checkpoint(exp / CKPTS / "last.ckpt")["global_step"] == int(stopped[0])
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, capture_output=True)
    assert load_checkpoint(exp / CKPTS / "last.ckpt")["global_step"] == 9


@pytest.mark.skipif(not all(map(shutil.which, ("slurmctld", "slurmd", "munged", "srun"))),
                    reason="a real SLURM needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)")
def test_slurm_preemption_requeues_the_job_and_it_continues_exactly(uninterrupted, tmp_path):
    """A one-node SLURM (bench/slurm_cluster.py): train.py under srun gets SIGUSR1 (scancel --signal=USR1, every
    process of the step), stops after the update in hand and requeues its job; the requeued job, started at once,
    ends at the uninterrupted run's weights."""
    data, straight = uninterrupted
    exp = tmp_path / "exp"
    script = f"#!/bin/bash\nsrun {' '.join(train_cmd(data, exp, 9, *SIGNAL_FLAGS))}\n"
    with SlurmCluster(tmp_path / "slurm") as cluster:
        job = cluster.submit(script, "--ntasks=1", "--requeue", f"--chdir={REPO}", f"--output={tmp_path}/job.log",
                             "--open-mode=append", env=ENV)
        cluster.wait_for(lambda: (exp / CKPTS / "epoch=0-step=3.ckpt").exists(), 300, "a checkpoint at update 3")
        cluster.signal(job, "USR1")
        state = cluster.wait_state(job, {"PENDING", "COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
        assert state["JobState"] == "PENDING", (tmp_path / "job.log").read_text()[-3000:]  # requeued, not ended
        cluster.start_now(job)
        state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600)
    log = (tmp_path / "job.log").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    assert "stopped by SIGUSR1 after update" in log and f"SLURM job {job} requeued" in log
    resumed, reference = (load_checkpoint(e / CKPTS / "last.ckpt") for e in (exp, straight))
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


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
