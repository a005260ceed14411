"""Step 2 of preprocessing (upstream-spec §3.3): per-utterance MFCC or HuBERT-layer features, dumped in
shards ``feat/{split}_{rank}_{num_rank}.pt`` (float32, (sum T, D)) and ``feat/len_{split}_{rank}_{num_rank}.pt``
(float32 frame counts).

A third file, ``{split}_{rank}_{num_rank}.done``, is written last and holds a hash of the shard's TSV lines
and of the feature settings: a shard is complete (and skipped on a re-run) only when it matches.
"""
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import soundfile
import torch
import torchaudio
from torch import Tensor
from tqdm import tqdm

from utils.checkpoint import load_pretrained_model
from utils.common_utils import SAMPLE_RATE, atomic_write

log = logging.getLogger(__name__)


def read_tsv(path) -> Tuple[str, List[str]]:
    """(root, lines after the root) of a TSV file list; each line is '<relative path>\\t<num_samples>'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file list {path} not found")
    text = path.read_text()
    if not text:
        raise ValueError(f"TSV file list {path} is empty (its first line must be the root folder)")
    root, *lines = text.splitlines()
    for number, line in enumerate(lines, start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"{path}:{number}: expected '<relative path>\\t<num_samples>', got {line!r}")
    return root, lines


def shard_range(n: int, rank: int, num_rank: int) -> Tuple[int, int]:
    """[start, end) of shard ``rank`` (1-based) of ``num_rank`` over n lines, with upstream's rounding
    (Python ``round``, half to even), so the shard files match upstream's."""
    if not 1 <= rank <= num_rank:
        raise ValueError(f"rank must be in [1, {num_rank}], got {rank}")
    if n <= 0:
        raise ValueError("cannot shard an empty file list")
    return round(n / num_rank * (rank - 1)), round(n / num_rank * rank)


def shard_paths(feat_dir, split: str, rank: int, num_rank: int) -> Tuple[Path, Path, Path]:
    """(features, lengths, done marker) of one shard."""
    feat_dir = Path(feat_dir)
    name = f"{split}_{rank}_{num_rank}"
    return feat_dir / f"{name}.pt", feat_dir / f"len_{name}.pt", feat_dir / f"{name}.done"


def load_audio(path, num_samples: Optional[int] = None) -> Tensor:
    """Channel 0 of a 16 kHz file as float32 in [-1, 1) (what ``torchaudio.load`` gives), with errors
    that name the file."""
    try:
        waveform, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise ValueError(f"{path}: cannot decode audio: {e}") from e
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {sample_rate} Hz, expected {SAMPLE_RATE}")
    if num_samples is not None and len(waveform) != num_samples:
        raise ValueError(f"{path}: has {len(waveform)} samples but the TSV says {num_samples} "
                         "(file changed or truncated since the file list was made)")
    return torch.from_numpy(waveform[:, 0].copy())


@dataclass
class Extractor:
    """What a feature type gives ``dump_features``: waveform (N,) -> features (T, D), the width D, and a
    description that goes into the shard hash (so another checkpoint or layer recomputes the shards)."""
    extract: Callable[[Tensor], Tensor]
    dim: int
    description: str


def mfcc_extractor() -> Extractor:
    """13 MFCCs (128 mel bins, 25 ms window, 10 ms hop, no centring: 100 Hz) plus deltas and delta-deltas
    → (T, 39), T = floor((N - 400) / 160) + 1. The transform is built once."""
    with warnings.catch_warnings():  # 128 mel bins over 201 FFT bins leave some filters empty, as upstream
        warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
        transform = torchaudio.transforms.MFCC(
            sample_rate=SAMPLE_RATE, n_mfcc=13, melkwargs={"n_fft": 400, "hop_length": 160, "center": False})

    def extract(waveform: Tensor) -> Tensor:
        mfcc = transform(waveform)
        deltas = torchaudio.functional.compute_deltas(mfcc)
        ddeltas = torchaudio.functional.compute_deltas(deltas)
        return torch.cat([mfcc, deltas, ddeltas], dim=0).transpose(0, 1).contiguous()

    return Extractor(extract, 39, "mfcc")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hubert_extractor(checkpoint_path, layer_index: int, device) -> Extractor:
    """Output of transformer layer ``layer_index`` (1-based) of a pre-trained model → (T, D) at 50 Hz,
    T = floor((N - 400) / 320) + 1. Unlike upstream the model is in eval mode (no dropout), so the
    features are deterministic."""
    model = load_pretrained_model(checkpoint_path, map_location="cpu")
    num_layers = model.config["encoder_num_layers"]
    if not 1 <= layer_index <= num_layers:
        raise ValueError(f"--layer-index {layer_index} is out of range: {checkpoint_path} has {num_layers} "
                         "transformer layers (1-based)")
    wav2vec2 = model.wav2vec2.to(device).eval()

    def extract(waveform: Tensor) -> Tensor:
        with torch.inference_mode():
            layers, _ = wav2vec2.extract_features(waveform[None].to(device), num_layers=layer_index)
        return layers[-1][0].float().cpu()

    description = f"hubert layer {layer_index} of checkpoint sha256 {file_sha256(checkpoint_path)}"
    return Extractor(extract, model.config["encoder_embed_dim"], description)


def shard_key(root: str, lines: List[str], extractor: Extractor) -> str:
    """Hash of everything a shard's content depends on."""
    return hashlib.sha256("\n".join([extractor.description, root, *lines]).encode()).hexdigest()


def shard_is_done(feat_dir, split: str, rank: int, num_rank: int, key: str) -> bool:
    feat, lengths, done = shard_paths(feat_dir, split, rank, num_rank)
    return feat.is_file() and lengths.is_file() and done.is_file() and done.read_text() == key


def dump_features(tsv_file, feat_dir, split: str, rank: int, num_rank: int, extractor: Extractor) -> bool:
    """Extract and save the features of shard ``rank`` of ``tsv_file``; False if it was already done."""
    root, lines = read_tsv(tsv_file)
    start, end = shard_range(len(lines), rank, num_rank)
    key = shard_key(root, lines[start:end], extractor)
    if shard_is_done(feat_dir, split, rank, num_rank, key):
        log.info("%s shard %d/%d is already done", split, rank, num_rank)
        return False
    feats, lens = [], []
    for line in tqdm(lines[start:end], desc=f"{split} features {rank}/{num_rank}", unit="file"):
        rel, num_samples = line.split("\t")
        feature = extractor.extract(load_audio(f"{root}/{rel}", int(num_samples)))
        feats.append(feature)
        lens.append(len(feature))
    feat_path, len_path, done_path = shard_paths(feat_dir, split, rank, num_rank)
    Path(feat_dir).mkdir(parents=True, exist_ok=True)
    with atomic_write(feat_path) as f:
        torch.save(torch.cat(feats) if feats else torch.zeros(0, extractor.dim), f)
    with atomic_write(len_path) as f:
        torch.save(torch.tensor(lens, dtype=torch.float32), f)
    with atomic_write(done_path, "w") as f:
        f.write(key)
    return True
