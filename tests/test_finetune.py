"""finetune.py + lightning_finetune.py through the real Lightning Trainer on CPU, on tone "speech" whose letters a
CTC model can learn (tests/fixtures.make_transcribed_corpus)."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
from model import hubert_pretrain_tiny
from tests.fixtures import LETTERS, make_transcribed_corpus
from utils.checkpoint import load_checkpoint, load_finetuned_model

REPO = Path(__file__).resolve().parents[1]
# Sized for seconds of CPU: 4-utterance batches, light masking, validation every 4 updates.
SMALL = ["--num-workers", "0", "--log-every-n-steps", "1", "--seconds-per-batch", "6", "--learning-rate", "3e-4",
         "--warmup-updates", "2", "--hold-updates", "100", "--decay-updates", "10", "--mask-prob", "0.1",
         "--mask-channel-prob", "0.1", "--mask-channel-length", "16", "--encoder-layer-drop", "0",
         "--val-check-interval", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return make_transcribed_corpus(root / "train", n_utts=8), make_transcribed_corpus(root / "dev", n_utts=3, seed=1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pre-training checkpoint as train.py writes it, in the conv2d / instance-norm layout."""
    torch.manual_seed(0)
    model = hubert_pretrain_tiny(use_conv2d=True, use_instancenorm=True)
    path = tmp_path_factory.mktemp("pretrained") / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hubert_config": model.config, "global_step": 10}, path)
    return path


def args_for(corpus, pretrained, exp, *extra):
    train_dir, dev_dir = corpus
    return ["--checkpoint", str(pretrained), "--train-dir", str(train_dir), "--valid-dir", str(dev_dir),
            "--exp-dir", str(exp), *SMALL, *extra]


def metrics(exp: Path):
    with open(next(exp.glob("lightning_logs/version_*/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def last_ckpt(exp: Path) -> Path:
    return exp / "checkpoints_hubert_pretrain_tiny" / "last.ckpt"


def test_finetune_learns_to_read_the_tones(corpus, pretrained, tmp_path, capsys):
    trainer, module = finetune.main(args_for(corpus, pretrained, tmp_path / "exp", "--max-updates", "40",
                                             "--freeze-encoder-updates", "4"))
    assert trainer.global_step == 40 and module.skipped_steps == 0
    rows = metrics(tmp_path / "exp")
    losses = [float(r["train_loss_step"]) for r in rows if r["train_loss_step"]]
    frozen = [float(r["encoder_frozen"]) for r in rows if r["encoder_frozen"]]
    assert frozen[:4] == [1.0] * 4 and set(frozen[4:]) == {0.0}
    val_losses = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    cer = [float(r["val_cer"]) for r in rows if r["val_cer"]]
    assert len(losses) == 40 and len(val_losses) == len(cer) == 10 and all(0 <= c < 5 for c in cer)
    # From the frozen updates' ~160 per utterance to below the all-blank plateau (~30): it reads some letters.
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3]), losses
    assert val_losses[-1] < 0.5 * val_losses[0], val_losses
    assert "val CER" in capsys.readouterr().out
    shares = [float(r["padding_share"]) for r in rows if r["padding_share"]]
    assert len(shares) == 40 and all(0 <= v < 1 for v in shares) and max(shares) > 0  # padded, not cropped
    assert sum(1 for r in rows if r["audio_seconds_per_second"]) == 40

    ckpt = load_checkpoint(last_ckpt(tmp_path / "exp"))
    keys = ckpt["state_dict"].keys()
    assert {"aux.weight", "aux.bias"} <= keys and all(k.startswith(("model.", "aux.")) for k in keys)
    assert "model.wav2vec2.feature_extractor.conv_layers.0.conv.weight" in keys and any(
        k.startswith("model.mask_generator.") for k in keys)
    assert ckpt["state_dict"]["model.wav2vec2.feature_extractor.conv_layers.0.conv.weight"].ndim == 3  # conv1d
    assert ckpt["ctc_vocab"][:2] == ["-", "|"] and len(ckpt["ctc_vocab"]) == 29
    assert ckpt["hubert_config"]["mask_channel_length"] == 16
    # The CNN never moves (frozen from the start), the transformer does after the frozen updates.
    source = load_checkpoint(pretrained)["state_dict"]
    conv = "model.wav2vec2.feature_extractor.conv_layers.3.conv.weight"
    assert torch.equal(ckpt["state_dict"][conv], source[conv].squeeze(2))
    layer = "model.wav2vec2.encoder.transformer.layers.0.feed_forward.output_dense.weight"
    assert not torch.equal(ckpt["state_dict"][layer], source[layer])
    encoder, vocab = load_finetuned_model(last_ckpt(tmp_path / "exp"))
    assert encoder.aux.out_features == len(vocab) == 29


@pytest.mark.numerics
@pytest.mark.parametrize("stop", ["mid_epoch", "epoch_end"])
def test_a_finished_run_extended_ends_with_the_uninterrupted_weights(corpus, pretrained, tmp_path, capsys, stop):
    """A run that reached --max-updates, resumed from its last.ckpt with a larger one, ends bit for bit where a
    run planned that long does (the tri-stage LR does not depend on --max-updates). Lightning had counted the
    epoch it stopped in as done: the resume stopped mid-epoch, or skipped an epoch's data at an epoch's end.
    The same --max-updates again: "already done", exit 0."""
    common = ["--freeze-encoder-updates", "3", "--seconds-per-batch", "4", "--mask-prob", "0.65",
              "--encoder-layer-drop", "0.5", "--val-check-interval", "3"]
    finetune.main(args_for(corpus, pretrained, tmp_path / "straight", *common, "--max-updates", "8"))
    straight = load_checkpoint(last_ckpt(tmp_path / "straight"))
    epoch = straight["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["layout"]["micro_batches"]
    first = {"mid_epoch": 2, "epoch_end": epoch}[stop]
    assert first < 8 and (first < epoch) == (stop == "mid_epoch")
    finetune.main(args_for(corpus, pretrained, tmp_path / "run", *common, "--max-updates", str(first)))
    last = last_ckpt(tmp_path / "run")
    with pytest.raises(SystemExit) as done:
        finetune.main(args_for(corpus, pretrained, tmp_path / "run", *common, "--max-updates", str(first),
                               "--resume-checkpoint", str(last)))
    assert done.value.code == 0 and "the run is already done" in capsys.readouterr().out
    trainer, _ = finetune.main(args_for(corpus, pretrained, tmp_path / "run", *common, "--max-updates", "8",
                                        "--resume-checkpoint", str(last)))
    assert trainer.global_step == 8
    extended = load_checkpoint(last_ckpt(tmp_path / "run"))
    for key, value in straight["state_dict"].items():
        assert torch.equal(extended["state_dict"][key], value), key


@pytest.mark.numerics
def test_resume_continues_exactly(corpus, pretrained, tmp_path):
    """8 updates straight == 3 updates, stop mid-epoch, resume from that checkpoint, 5 more (the encoder thaws
    at 3): the resumed run skips the batches it had trained on and draws the same masks. A checkpoint without
    the loader state (older runs) resumes at its update count, with a warning."""
    common = ["--max-updates", "8", "--freeze-encoder-updates", "3", "--seconds-per-batch", "2",
              "--val-check-interval", "3", "--mask-prob", "0.65", "--encoder-layer-drop", "0.5"]
    finetune.main(args_for(corpus, pretrained, tmp_path / "straight", *common))
    first = next((tmp_path / "straight" / "checkpoints_hubert_pretrain_tiny").glob("epoch=0-step=3.ckpt"))
    (data,) = load_checkpoint(first)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert data["epoch"] == 0 and data["consumed"] == 3 < data["layout"]["micro_batches"]  # mid-epoch
    trainer, _ = finetune.main(args_for(corpus, pretrained, tmp_path / "resumed", *common,
                                        "--resume-checkpoint", str(first)))
    assert trainer.global_step == 8
    straight, resumed = (load_checkpoint(last_ckpt(tmp_path / d)) for d in ("straight", "resumed"))
    assert resumed["lr_schedulers"][0]["_step_count"] == straight["lr_schedulers"][0]["_step_count"]
    for key, value in straight["state_dict"].items():  # one machine, the same kernels: bit for bit
        assert torch.equal(resumed["state_dict"][key], value), key

    # A checkpoint written before the loader saved its position resumes at its update count, with a warning.
    ckpt = torch.load(first, weights_only=False)
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="predates resumable data"):
        trainer, _ = finetune.main(args_for(corpus, pretrained, tmp_path / "old", *common,
                                            "--resume-checkpoint", str(tmp_path / "old.ckpt")))
    assert trainer.global_step == 8


def test_validation_does_not_mask(corpus, pretrained, tmp_path):
    """Upstream applied time and channel masking in validation too (MaskGenerator has no training check)."""
    _, module = finetune.build(finetune.parse_args(args_for(corpus, pretrained, tmp_path / "exp",
                                                            "--mask-prob", "0.9", "--mask-channel-prob", "0.9")))
    waveforms, lengths = torch.randn(2, 16000), torch.tensor([16000, 12000])
    module.eval()
    with torch.no_grad():
        first, out_len = module(waveforms, lengths)
        second, _ = module(waveforms, lengths)
        module.model.mask_generator.mask_prob = module.model.mask_generator.mask_channel_prob = 0.0
        unmasked, _ = module(waveforms, lengths)
    assert torch.equal(first, second) and torch.equal(first, unmasked)
    assert out_len.tolist() == [49, 37]
    module.train()
    with torch.no_grad():
        module.model.mask_generator.mask_prob = 0.9
        assert not torch.allclose(module(waveforms, lengths)[0], unmasked)


def test_random_init_baseline_and_aux_width(corpus, tmp_path):
    _, module = finetune.build(finetune.parse_args([
        "--random-init", "--model-name", "hubert_pretrain_tiny", "--train-dir", str(corpus[0]),
        "--valid-dir", str(corpus[1]), "--exp-dir", str(tmp_path / "exp"), "--model-arg", "mask_length=7"]))
    assert module.aux.in_features == 256  # the encoder's width (upstream's Habana module: always 768)
    assert module.model.mask_generator.mask_length == 7


def test_a_token_vocabulary_fine_tunes_and_decodes_phones(corpus, pretrained, tmp_path, capsys):
    """--vocab: one CTC output per token; transcripts list the tokens (each tone a 'phone', no word breaks)."""
    import evaluate
    from dataset import list_utterances

    (tmp_path / "phones.txt").write_text("".join(f"{c.lower()}\n" for c in LETTERS))
    folders = []
    for folder in corpus:
        copy = Path(shutil.copytree(folder, tmp_path / folder.name))
        for trans in copy.rglob("*.trans.txt"):
            lines = [line.partition(" ") for line in trans.read_text().splitlines()]
            trans.write_text("".join(f"{utt} {' '.join(text.replace(' ', ''))}\n" for utt, _, text in lines))
        folders.append(copy)
    vocab = ("-", *LETTERS)
    with pytest.raises(ValueError, match=r"7-70.trans.txt:1: tokens \['[A-Z]{2,}"):
        list_utterances([corpus[0]], vocab=vocab)  # words are not tokens
    exp = tmp_path / "exp"
    finetune.main(args_for(folders, pretrained, exp, "--vocab", str(tmp_path / "phones.txt"), "--max-updates", "4",
                           "--freeze-encoder-updates", "2"))
    model, saved = load_finetuned_model(last_ckpt(exp))
    assert saved == vocab and model.aux.out_features == len(LETTERS) + 1
    [(_, n, per, _, out)] = evaluate.main(["--checkpoint", str(last_ckpt(exp)), "--data-dir", str(folders[1]),
                                           "--out-dir", str(tmp_path / "eval")])
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert n == len(rows) == 3 and 0 <= per and all(set(hyp.split()) <= set(LETTERS) for _, _, hyp in rows)
    assert all(len(ref.split()) == len(ref.replace(" ", "")) for _, ref, _ in rows)  # one letter per token
    with pytest.raises(ValueError, match="fine-tuned on the vocabulary .*'A', 'B'.* not on this run's .*'\\|'"):
        finetune.main(args_for(corpus, pretrained, exp, "--max-updates", "6",
                               "--resume-checkpoint", str(last_ckpt(exp))))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        finetune.parse_args(args_for(folders, pretrained, exp, "--vocab", str(tmp_path / "phones.txt"),
                                     "--aux-num-out", "29"))
    assert "--aux-num-out must be 11, the size of the vocabulary" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("aa\nb\nAA\n")
    with pytest.raises(SystemExit):
        finetune.parse_args(args_for(folders, pretrained, exp, "--vocab", str(tmp_path / "bad.txt")))
    assert "bad.txt: expected one token per line" in capsys.readouterr().err


def test_bad_arguments_and_files_are_named(corpus, pretrained, tmp_path):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--train-dir", "x", "--valid-dir", "y"])  # neither --checkpoint nor --random-init
    with pytest.raises(SystemExit, match="nope.ckpt does not exist"):
        finetune.main(args_for(corpus, tmp_path / "nope.ckpt", tmp_path / "exp"))
    with pytest.raises(SystemExit, match="holds a hubert_pretrain_tiny model"):
        finetune.main(args_for(corpus, pretrained, tmp_path / "exp", "--model-name", "hubert_pretrain_base"))
    with pytest.raises(SystemExit, match="no LibriLight-limited data"):
        finetune.main(["--checkpoint", str(pretrained), "--dataset-path", str(tmp_path)])
    with pytest.raises(ValueError, match="cannot hold the longest train utterance"):
        finetune.main(args_for(corpus, pretrained, tmp_path / "exp", "--seconds-per-batch", "1", "--max-updates", "1"))


def test_two_process_ddp_over_gloo_thaws_the_encoder_in_step(corpus, pretrained, tmp_path):
    """Frozen updates leave the transformer without gradients, so DDP must look for unused parameters."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
           str(REPO / "finetune.py"), *args_for(corpus, pretrained, tmp_path / "exp", "--accelerator", "cpu",
                                               "--devices", "2", "--max-updates", "3", "--freeze-encoder-updates", "1",
                                               "--seconds-per-batch", "3")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(last_ckpt(tmp_path / "exp"))
    assert ckpt["global_step"] == 3
    layer = "model.wav2vec2.encoder.transformer.layers.0.feed_forward.output_dense.weight"
    assert not torch.equal(ckpt["state_dict"][layer], load_checkpoint(pretrained)["state_dict"][layer])
