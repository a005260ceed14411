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
