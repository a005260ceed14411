"""train.py + lightning.py through the real Lightning Trainer on CPU."""
import csv
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import train
from tests.fixtures import make_prepared_dataset
from utils.checkpoint import load_checkpoint
from utils.device import fast_cpu_bf16

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model-name", "hubert_pretrain_tiny", "--num-workers", "0", "--log-every-n-steps", "1"]


def args_for(data, exp, *extra, feature_type="mfcc", num_classes=10):
    return ["--dataset-path", str(data), "--exp-dir", str(exp), "--feature-type", feature_type,
            "--num-classes", str(num_classes), *TINY, *extra]


def metrics(exp: Path):
    with open(next(exp.glob("lightning_logs/version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    return rows


def last_ckpt(exp: Path) -> Path:
    return exp / "checkpoints_librispeech_hubert_pretrain_tiny" / "last.ckpt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"))


def test_overfitting_one_utterance_lowers_the_loss(tmp_path):
    """One utterance: the loss must fall well below what learning the label frequencies alone gives
    (the entropy of its label distribution), i.e. the model uses the audio and the context."""
    data = make_prepared_dataset(tmp_path / "one", n_train=1, n_valid=1, seconds=(3.0, 3.0))
    train.main(args_for(data, tmp_path / "exp", "--max-updates", "40", "--warmup-updates", "3",
                        "--learning-rate", "0.002", "--feature-weight", "0", "--all-deterministic", "--no-layerdrop",
                        "--seconds-per-batch", "16"))
    losses = [float(r["train_loss_step"]) for r in metrics(tmp_path / "exp") if r["train_loss_step"]]
    assert len(losses) == 40
    labels = np.array((data / "label" / "label_train.pt").read_text().split(), dtype=int)[::2]
    prior = np.bincount(labels) / len(labels)
    entropy = -sum(p * math.log(p) for p in prior if p > 0)
    assert np.mean(losses[-10:]) < 0.7 * entropy < np.mean(losses[:3]), (entropy, losses)


@pytest.mark.numerics
def test_resume_continues_step_lr_and_optimizer_exactly(data, tmp_path):
    """6 updates straight == 3 updates, stop, resume from that (epoch-end) checkpoint, 3 more. The checkpoints
    carry torchaudio 2.0's weight-norm names (--legacy-weight-norm), which resume too."""
    common = ["--max-updates", "6", "--warmup-updates", "2", "--seconds-per-batch", "16", "--legacy-weight-norm"]
    train.main(args_for(data, tmp_path / "straight", *common))
    first = tmp_path / "straight" / "checkpoints_librispeech_hubert_pretrain_tiny" / "epoch=0-step=3.ckpt"
    assert first.exists()
    keys = load_checkpoint(first)["state_dict"]
    assert "model.wav2vec2.encoder.transformer.pos_conv_embed.conv.weight_g" in keys
    assert not any("parametrizations" in k for k in keys)
    trainer, module = train.main(args_for(data, tmp_path / "resumed", *common, "--resume-checkpoint", str(first)))
    assert trainer.global_step == 6
    straight, resumed = load_checkpoint(last_ckpt(tmp_path / "straight")), load_checkpoint(last_ckpt(tmp_path / "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 6
    assert resumed["lr_schedulers"][0]["_step_count"] == straight["lr_schedulers"][0]["_step_count"]
    # One machine, the same kernels on both sides: bit for bit.
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for idx, state in straight["optimizer_states"][0]["state"].items():
        assert torch.equal(resumed["optimizer_states"][0]["state"][idx]["exp_avg_sq"], state["exp_avg_sq"]), idx


def ddp_ranks(data, tmp_path, *flags, port=29533, poison="", nodes=1):
    """tests/ddp_worker.py on 2 gloo ranks, 1 node x 2 processes or 2 nodes x 1 (a torch.distributed.run agent per
    node, on localhost): each rank's final weights and counts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "POISON": poison}
    worker = [str(REPO / "tests" / "ddp_worker.py"), str(tmp_path / "weights"),
              *args_for(data, tmp_path / "exp", "--accelerator", "cpu", "--devices", str(2 // nodes),
                        "--warmup-updates", "1", "--seconds-per-batch", "16", "--accumulate-grad-batches", "2", *flags)]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node-rank={r}",
                                f"--nproc_per_node={2 // nodes}", "--master-addr=127.0.0.1", f"--master-port={port}",
                                *worker], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) for r in range(nodes)]
    errors = [agent.communicate(timeout=600)[1] for agent in agents]
    assert [agent.returncode for agent in agents] == [0] * nodes, errors[-1][-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"weights.{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in rank0["state_dict"].items():
        assert torch.equal(rank1["state_dict"][key], value), key
    return rank0, rank1


def test_two_process_ddp_over_gloo_ends_with_identical_weights(data, tmp_path):
    """With 2 micro-batches per update DDP all-reduces after the second only (no_sync before): the ranks
    still end equal. Without layer drop, as HuBERT Large's config, DDP does not look for unused parameters."""
    rank0, rank1 = ddp_ranks(data, tmp_path, "--max-updates", "3", "--model-arg", "encoder_layer_drop=0")
    assert rank0["global_step"] == rank1["global_step"] == 3 and rank0["world_size"] == 2
    start = torch.load(tmp_path / "weights.init.pt", weights_only=True)
    assert any(not torch.equal(start[k], v) for k, v in rank0["state_dict"].items()), "nothing was trained"


def test_two_nodes_of_one_process_train_as_one_node_of_two(data, tmp_path):
    """2 nodes x 1 process (two torchrun agents) end at the weights of 1 node x 2 processes, bit for bit."""
    runs = []
    for nodes, port in ((1, 29535), (2, 29536)):
        (tmp_path / str(nodes)).mkdir()
        runs.append(ddp_ranks(data, tmp_path / str(nodes), "--max-updates", "3", port=port, nodes=nodes)[0])
    assert runs[1]["world_size"] == 2 and runs[0]["global_step"] == runs[1]["global_step"] == 3
    for key, value in runs[0]["state_dict"].items():
        assert torch.equal(runs[1]["state_dict"][key], value), key


def test_ddp_skip_at_a_later_micro_batch_leaves_ddp_in_step(tmp_path):
    """Layer drop 0.5, 2 micro-batches per update, a NaN loss on rank 1 at micro-batch 1: the update is skipped
    on both ranks, and the updates after it (layers dropped) train on. The skip used to stop the window after
    micro-batch 0's backward under no_sync; DDP kept its record of used layers, and the next synced backward
    with one of them dropped failed ("gradient which is undefined, but still allreduced by DDP reducer")."""
    data = make_prepared_dataset(tmp_path / "d", n_train=48)
    rank0, rank1 = ddp_ranks(data, tmp_path, "--max-updates", "6", "--model-arg", "encoder_layer_drop=0.5",
                             "--seed", "1", port=29534, poison="0,1,1")
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == 1
    assert rank0["global_step"] == rank1["global_step"] == 6


@pytest.mark.parametrize("flags, unused", [
    ([], True),  # the tiny model's layer drop, 0.05
    (["--no-layerdrop"], False),
    (["--static-layerdrop"], False),  # every layer computed
    (["--model-arg", "encoder_layer_drop=0"], False),
    (["--model-name", "hubert_pretrain_large"], False),  # its config has no layer drop
], ids=["tiny", "no_layerdrop", "static_layerdrop", "model_arg", "large"])
def test_ddp_looks_for_unused_parameters_only_when_layers_drop(data, tmp_path, flags, unused):
    trainer, module = train.build(train.parse_args(args_for(data, tmp_path / "exp", "--accelerator", "cpu",
                                                            "--devices", "2", *flags)))
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is unused


# Habana README command lines (spec §9.4), with only the device flags swapped for CPU, plus the
# overrides a 2-core test needs (tiny model, one update, a small batch).
ITER1 = ("--feature-type mfcc --num-class 100 --max-updates 245594 --warmup-updates 31436 --learning-rate 0.0005 "
         "--hpus 8 --num-nodes 1 --num-buckets=10 --align-buckets=bucket1 --accumulate-grad-batches 1 --all-static "
         "--use-conv2d --use-instancenorm --use-fused-clip --optimizer fusedadamw --autocast --seconds-per-batch 350 "
         "--use-max-sub-softmax-opt --recompilation-optimization")
ITER2 = ("--feature-type hubert --num-class 500 --max-updates 395120 --warmup-updates 31610 --learning-rate 0.0005 "
         "--hpus 8 --num-nodes 1 --num-buckets=10 --align-buckets=bucket1 --accumulate-grad-batches 2 --all-static "
         "--use-conv2d --use-instancenorm --use-fused-clip --optimizer fusedadamw --autocast --seconds-per-batch 175 "
         "--use-max-sub-softmax-opt --recompilation-optimization --split-logits")


@pytest.mark.parametrize("command, feature_type, num_classes", [(ITER1, "mfcc", 100), (ITER2, "hubert", 500)],
                         ids=["iteration1", "iteration2"])
def test_seed_command_lines_run_on_cpu(tmp_path, caplog, command, feature_type, num_classes):
    data = make_prepared_dataset(tmp_path / "d", n_train=4, n_valid=2, feature_type=feature_type,
                                 num_classes=num_classes)
    flags = command.replace("--hpus 8", "--accelerator cpu --devices 1").split()
    argv = ["--dataset-path", str(data), "--exp-dir", str(tmp_path / "exp"), *flags, *TINY,
            "--max-updates", "2", "--warmup-updates", "1", "--seconds-per-batch", "16"]
    caplog.set_level(logging.INFO)
    trainer, module = train.main(argv)
    assert trainer.global_step == 2 and module.skipped_steps == 0
    assert module.hparams.use_autocast  # --autocast: bf16 on CPU too
    assert "precision: bf16 autocast (1 CPU x 1 node(s))" in caplog.text
    model = module.model
    assert model.static_logit_generator and model.logit_generator.split_logits == (feature_type == "hubert")
    assert model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.ndim == 4
    assert isinstance(module.optimizers().optimizer, torch.optim.AdamW)
    assert module.optimizers().optimizer.defaults["fused"]


def test_missing_device_says_what_is_there(tmp_path):
    with pytest.raises(SystemExit, match=r"asked for 8 HPU\(s\), but this machine has CPU .* use --accelerator cpu"):
        train.main(["--dataset-path", str(tmp_path), "--feature-type", "mfcc", "--num-classes", "100",
                    "--hpus", "8"])


def test_betas_parse():
    assert train.parse_args(["--dataset-path", "x", "--feature-type", "mfcc", "--num-classes", "100",
                             "--betas", "(0.9, 0.95)"]).betas == (0.9, 0.95)
    assert train.parse_betas("0.8,0.9") == (0.8, 0.9)
    with pytest.raises(Exception, match="two floats"):
        train.parse_betas("0.9")


def test_feature_grad_mult_one_means_unscaled(data, tmp_path):
    assert train.parse_grad_mult("0.1") == 0.1 and train.parse_grad_mult("1") is None
    with pytest.raises(Exception, match=r"\(0, 1\]"):
        train.parse_grad_mult("1.5")
    module = train.build(train.parse_args(["--dataset-path", str(data), "--feature-type", "mfcc",
                                           "--num-classes", "10", "--model-name", "hubert_pretrain_tiny",
                                           "--feature-grad-mult", "1", "--exp-dir", str(tmp_path / "exp")]))[1]
    assert module.model.feature_grad_mult is None


def test_tiny_model_brings_its_recipe_and_flags_win():
    base = ["--dataset-path", "x", "--feature-type", "mfcc", "--num-classes", "100"]
    upstream = train.parse_args(base)
    assert {name: getattr(upstream, name) for name in train.UPSTREAM_DEFAULTS} == dict(
        learning_rate=0.0005, warmup_updates=32000, max_updates=250000, seconds_per_batch=87.5, unmasked_weight=0.0,
        feature_weight=10.0, precision="auto")
    tiny = train.parse_args(base + ["--model-name", "hubert_pretrain_tiny"])
    assert {name: getattr(tiny, name) for name in train.UPSTREAM_DEFAULTS} == train.RECIPES["hubert_pretrain_tiny"]
    mixed = train.parse_args(base + ["--model-name", "hubert_pretrain_tiny", "--learning-rate", "0.001",
                                     "--feature-weight", "10"])
    assert (mixed.learning_rate, mixed.feature_weight, mixed.unmasked_weight) == (0.001, 10.0, 0.5)
    assert tiny.precision == ("bf16" if fast_cpu_bf16() else "auto")  # bf16 where the CPU has it in hardware
    assert train.parse_args(base + ["--model-name", "hubert_pretrain_tiny", "--precision", "fp32"]).precision == "fp32"


def test_model_args_and_loss_weights_reach_the_model(tmp_path):
    data = make_prepared_dataset(tmp_path / "d", n_train=3, n_valid=1)
    args = train.parse_args(args_for(data, tmp_path / "exp", "--max-updates", "2", "--warmup-updates", "1",
                                     "--seconds-per-batch", "16", "--unmasked-weight", "0.5", "--feature-weight", "0",
                                     "--model-arg", "encoder_layer_norm_first=False",
                                     "--model-arg", "label_embedding_init=uniform"))
    _, module = train.build(args)
    assert module.model.config["encoder_layer_norm_first"] is False  # the tiny model's default is pre-LN
    assert module.model.logit_generator.label_embeddings.min() >= 0  # uniform [0, 1), not tiny's normal
    assert module.loss_weights == dict(masked_weight=1.0, unmasked_weight=0.5, feature_weight=0.0)
    assert train.parse_model_arg("extractor_conv_layer_config=[(64,10,5)]") == (
        "extractor_conv_layer_config", [(64, 10, 5)])


def test_compile_keeps_checkpoint_names_plain(tmp_path):
    data = make_prepared_dataset(tmp_path / "d", n_train=3, n_valid=1)
    _, module = train.build(train.parse_args(args_for(data, tmp_path / "exp", "--compile", "--max-updates", "2",
                                                      "--warmup-updates", "1", "--seconds-per-batch", "16")))
    assert isinstance(module._forward, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.config.recompile_limit >= 64
    assert all(key.startswith("model.") and "_orig_mod" not in key for key in module.state_dict())


@pytest.mark.parametrize("flags, message", [
    (["--align-buckets", "bucket1", "--num-buckets", "10", "--seconds-per-batch", "15.625"],
     r"--seconds-per-batch 15.625 is below 15.6251 s \(250001 samples\), what --align-buckets bucket1 with 10 buckets"),
    (["--seconds-per-batch", "15"], r"below 15.625 s \(250000 samples\), the longest training utterance"),
    (["--accumulate-grad-batches", "0"], "--accumulate-grad-batches must be at least 1, got 0"),
    (["--val-check-interval", "0"], "--val-check-interval must be at least 1, got 0"),
    (["--num-workers", "-1"], "--num-workers must be at least 0"),
    (["--save-top-k", "-1"], "--save-top-k must be at least 0"),
    (["--clip-norm", "0"], "--clip-norm must be positive"),
    (["--gpus", "0"], "give at least 1"),
    (["--precision", "fp32", "--autocast"], "give one of them"),
])
def test_flag_combinations_that_would_fail_later_fail_at_once(capsys, flags, message):
    with pytest.raises(SystemExit):
        train.parse_args(["--dataset-path", "x", "--feature-type", "mfcc", "--num-classes", "100", *flags])
    assert re.search(message, capsys.readouterr().err)
    train.parse_args(["--dataset-path", "x", "--feature-type", "mfcc", "--num-classes", "100", "--align-buckets",
                      "bucket1", "--num-buckets", "10", "--seconds-per-batch", "15.6251"])


def test_dataset_path_without_preprocess_files_is_named(tmp_path):
    (tmp_path / "tsv").mkdir()
    (tmp_path / "tsv" / "librispeech_train.tsv").write_text("/x\n")
    with pytest.raises(SystemExit, match=r"lacks label/label_train.pt, tsv/librispeech_valid.tsv, label/label_valid"):
        train.main(["--dataset-path", str(tmp_path), "--feature-type", "mfcc", "--num-classes", "100"])


class EpochRecorder(pl.Callback):
    def __init__(self):
        self.datasets, self.plans = [], []

    def on_train_epoch_start(self, trainer, module):
        self.datasets.append(module._datasets["train"])
        self.plans.append([plan.batches for plan in module._loaders["train"].sampler])


def test_datasets_built_once_epochs_reshuffled_and_checkpoints_written_once(data, tmp_path):
    """Several epochs: one train dataset object, a new batch plan each epoch. Validation every 2 updates
    with --save-top-k 1: each state is written once, at most the best by val_loss, the best by train_loss
    and the newest stay, last.ckpt links to the newest, and the final state (update 9) is kept too."""
    args = train.parse_args(args_for(data, tmp_path / "exp", "--max-updates", "9", "--warmup-updates", "1",
                                     "--seconds-per-batch", "16", "--val-check-interval", "2", "--save-top-k", "1"))
    trainer, module = train.build(args)
    recorder = EpochRecorder()
    trainer.callbacks.append(recorder)
    trainer.fit(module)
    assert len(recorder.plans) >= 3
    assert all(d is recorder.datasets[0] for d in recorder.datasets)
    assert all(a != b for a, b in zip(recorder.plans, recorder.plans[1:]))
    ckpts = last_ckpt(tmp_path / "exp").parent
    files = sorted(p.name for p in ckpts.iterdir())
    assert len(files) <= 4 and not [f for f in files if "-v" in f or f.startswith(".")], files
    assert last_ckpt(tmp_path / "exp").is_symlink()
    final = load_checkpoint(last_ckpt(tmp_path / "exp"))
    assert final["global_step"] == 9 and os.readlink(last_ckpt(tmp_path / "exp")).endswith("-step=9.ckpt")
    keeper = final["callbacks"]["CheckpointKeeper"]
    assert {name for ranked in keeper["best"].values() for _, name in ranked} | {keeper["newest"]} == set(files) - {
        "last.ckpt"}


def lr_by_step(exp: Path) -> dict:
    return {int(r["step"]): float(r["lr"]) for r in metrics(exp) if r.get("lr")}


@pytest.mark.numerics
@pytest.mark.parametrize("stop", [2, 3], ids=["mid_epoch", "epoch_end"])
def test_a_finished_run_extends_exactly(data, tmp_path, capsys, stop):
    """The final checkpoint of a run that reached --max-updates (last.ckpt, written as training stopped)
    resumes with a larger --max-updates exactly as a checkpoint validation wrote at the same update does (and
    that one as an uninterrupted run: the tests above). Lightning had already counted the epoch it stopped in
    as done: the resume stopped with "the data would not resume exactly" (mid-epoch), or skipped the next
    epoch's data (at an epoch's end). The LR then decays to the new --max-updates (it stayed 0, the old
    schedule's end). Not the uninterrupted run's weights: the first run's LR had decayed to its own end."""
    common = ["--warmup-updates", "1", "--seconds-per-batch", "16"]
    ckpts = {}
    for name, interval in (("stopped", 4), ("validated", stop)):  # validation after the last update, or none
        train.main(args_for(data, tmp_path / name, *common, "--max-updates", str(stop),
                            "--val-check-interval", str(interval)))
        ckpts[name] = last_ckpt(tmp_path / name)
    (loader,) = load_checkpoint(ckpts["stopped"])["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["layout"]["micro_batches"] == 3
    assert ckpts["stopped"].resolve().name == f"epoch=1-step={stop}.ckpt"  # written as training stopped
    # Validation's checkpoint holds the final state: it is not written again under the next epoch's name.
    assert sorted(p.name for p in ckpts["validated"].parent.iterdir()) == [f"epoch=0-step={stop}.ckpt", "last.ckpt"]
    with pytest.raises(SystemExit) as done:  # the same --max-updates: nothing to do
        train.main(args_for(data, tmp_path / "stopped", *common, "--max-updates", str(stop),
                            "--resume-checkpoint", str(ckpts["stopped"])))
    assert done.value.code == 0 and "the run is already done" in capsys.readouterr().out
    for name, ckpt in ckpts.items():
        trainer, _ = train.main(args_for(data, tmp_path / f"{name}_extended", *common, "--max-updates", "6",
                                         "--val-check-interval", "2", "--resume-checkpoint", str(ckpt)))
        assert trainer.global_step == 6
    extended, reference = (load_checkpoint(last_ckpt(tmp_path / f"{d}_extended")) for d in ("stopped", "validated"))
    for key, value in reference["state_dict"].items():
        assert torch.equal(extended["state_dict"][key], value), key
    train.main(args_for(data, tmp_path / "straight", *common, "--max-updates", "6", "--val-check-interval", "2"))
    planned = lr_by_step(tmp_path / "straight")
    for name in ckpts:  # the LR of the new schedule, logged at the uninterrupted run's steps (was one early)
        assert {s: lr for s, lr in planned.items() if s >= stop} == lr_by_step(tmp_path / f"{name}_extended")


@pytest.mark.parametrize("interval, step", [(2, 2), (3, 3)], ids=["mid_epoch", "epoch_end"])
def test_checkpoints_from_before_resumable_data_still_resume(data, tmp_path, interval, step):
    """A checkpoint written before the train loader kept its position (no loader state in the fit loop) resumes
    at the loop's update count, with a warning when mid-epoch (not exactly: the batch order is drawn anew)."""
    common = ["--max-updates", "5", "--warmup-updates", "2", "--seconds-per-batch", "16",
              "--val-check-interval", str(interval)]
    train.main(args_for(data, tmp_path / "straight", *common))
    new = tmp_path / "straight" / "checkpoints_librispeech_hubert_pretrain_tiny" / f"epoch=0-step={step}.ckpt"
    ckpt = torch.load(new, weights_only=False)
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = train.main(args_for(data, tmp_path / "resumed", *common, "--resume-checkpoint", str(old)))
    assert trainer.global_step == 5
    assert any("predates resumable data" in str(w.message) for w in caught) == (step == 2)
