"""Small prepared datasets for tests: real FLAC files plus TSV and label files in preprocess.py's format."""
from pathlib import Path

import numpy as np
import soundfile as sf


def make_prepared_dataset(root: Path, n_train: int = 12, n_valid: int = 3, feature_type: str = "mfcc",
                          num_classes: int = 10, seconds=(2.0, 4.0), seed: int = 0) -> Path:
    """``root/audio/...flac`` and ``root/data/{tsv,label}``; returns the data folder for --dataset-path.

    Audio is noise plus a tone whose pitch follows the frame classes and labels are those classes, so a
    model can learn something; label rate 100 Hz (mfcc) or 50 Hz (hubert)."""
    rng = np.random.default_rng(seed)
    audio, data = root / "audio", root / "data"
    chapter = audio / "train-clean-100" / "1" / "2"
    for d in (chapter, data / "tsv", data / "label"):
        d.mkdir(parents=True, exist_ok=True)
    hop = 160 if feature_type == "mfcc" else 320
    for split, n in (("train", n_train), ("valid", n_valid)):
        tsv, labels = [str(audio)], []
        for i in range(n):
            num_samples = int(rng.uniform(*seconds) * 16000)
            frames = (num_samples - 400) // 320 + 1
            # "Phones": a class held for 8-24 frames (160-480 ms), so masked spans are predictable.
            runs = rng.integers(8, 25, frames)
            classes = np.repeat(rng.integers(0, num_classes, frames), runs)[:frames]
            freq = 200.0 + 150.0 * np.repeat(classes, 320)[:num_samples]
            freq = np.pad(freq, (0, num_samples - len(freq)), mode="edge")
            wave = 0.3 * np.sin(2 * np.pi * np.cumsum(freq) / 16000) + 0.05 * rng.standard_normal(num_samples)
            rel = f"train-clean-100/1/2/1-2-{split}{i:04d}.flac"
            sf.write(audio / rel, wave.astype(np.float32), 16000)
            tsv.append(f"{rel}\t{num_samples}")
            n_labels = (num_samples - 400) // hop + 1
            label = np.repeat(classes, 2)[:n_labels] if hop == 160 else classes[:n_labels]
            label = np.pad(label, (0, n_labels - len(label)), mode="edge")
            labels.append(" ".join(map(str, label)))
        (data / "tsv" / f"librispeech_{split}.tsv").write_text("\n".join(tsv) + "\n")
        (data / "label" / f"label_{split}.pt").write_text("\n".join(labels) + "\n")
    return data


LETTERS = "ABCDEHIOST"


def make_transcribed_corpus(root: Path, n_utts: int = 6, seed: int = 0, words=(2, 4)) -> Path:
    """A LibriSpeech-layout folder ``root/<spk>/<chapter>/`` with ``*.trans.txt`` and FLAC files in which
    every letter is an 80 ms tone of its own pitch and a space is 60 ms of near silence, so a CTC model can
    learn to read them; returns ``root``."""
    rng = np.random.default_rng(seed)
    chapter = root / "7" / "70"
    chapter.mkdir(parents=True, exist_ok=True)
    lines = []

    def word():  # no letter twice in a row: one long tone could not be told from two
        letters, length = [rng.choice(list(LETTERS))], rng.integers(2, 5)
        while len(letters) < length:
            letters.append(rng.choice([c for c in LETTERS if c != letters[-1]]))
        return "".join(letters)

    for i in range(n_utts):
        text = " ".join(word() for _ in range(rng.integers(*words)))
        pieces = [np.zeros(4000)]
        for c in text:
            t = np.arange(960 if c == " " else 1280) / 16000
            pieces.append(np.zeros_like(t) if c == " " else
                          0.4 * np.sin(2 * np.pi * (250 + 90 * LETTERS.index(c)) * t))
        pieces.append(np.zeros(4000))
        wave = np.concatenate(pieces) + 0.01 * rng.standard_normal(sum(len(p) for p in pieces))
        utt_id = f"7-70-{i:04d}"
        sf.write(chapter / f"{utt_id}.flac", wave.astype(np.float32), 16000)
        lines.append(f"{utt_id} {text}\n")
    (chapter / "7-70.trans.txt").write_text("".join(lines))
    return root


def save_finetuned_checkpoint(path: Path, use_conv2d: bool = False, seed: int = 0, vocab=None) -> Path:
    """A finetune.py-style checkpoint of a tiny model with every weight random (an identity layer norm would hide
    a swapped mapping) and a CTC head over ``vocab`` (default: the 29 characters)."""
    import torch

    from model import hubert_pretrain_tiny
    from utils.ctc import VOCAB

    vocab = VOCAB if vocab is None else vocab
    torch.manual_seed(seed)
    model = hubert_pretrain_tiny(use_conv2d=use_conv2d, use_instancenorm=use_conv2d)
    aux = torch.nn.Linear(256, len(vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {**{f"model.{k}": v for k, v in model.state_dict().items()},
             **{f"aux.{k}": v for k, v in aux.state_dict().items()}}
    torch.save({"state_dict": state, "hubert_config": model.config, "ctc_vocab": list(vocab), "global_step": 5}, path)
    return path
