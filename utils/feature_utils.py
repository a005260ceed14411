"""Step 2 of preprocessing (upstream-spec §3.3): per-utterance MFCC or HuBERT-layer features of the TSV's
shards (upstream's ``shard_range``), streamed into the shard files of ``utils.feature_shards`` for k-means
(all of a shard's utterances, or the ``--percent`` sample only) or extracted on the fly for the labels.

A shard's ``.done`` marker holds a hash of its TSV lines, of the feature settings and of which utterances it
holds: a shard is complete (and skipped on a re-run) only when it matches.
"""
import hashlib
import logging
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torchaudio
from torch import Tensor, nn
from tqdm import tqdm

from utils.checkpoint import load_pretrained_model
from utils.common_utils import SAMPLE_RATE, decode_utf8, load_audio
from utils.device import exact_fp32
from utils.feature_shards import ShardReader, shard_is_done, write_shard

log = logging.getLogger(__name__)


def read_tsv(path) -> Tuple[str, List[str]]:
    """(root, lines after the root) of a TSV file list; each line is '<relative path>\\t<num_samples>'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file list {path} not found")
    text = decode_utf8(path.read_bytes(), path)
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


@dataclass
class Shard:
    """Shard ``rank`` (1-based) of ``num_rank`` of a split's file list: its root and lines."""
    split: str
    rank: int
    num_rank: int
    root: str
    lines: List[str]

    @property
    def name(self) -> str:
        return f"{self.split} {self.rank}/{self.num_rank}"

    def num_samples(self) -> List[int]:
        return [int(line.split("\t")[1]) for line in self.lines]

    def key(self, extractor: "Extractor") -> str:
        """Hash of everything the shard's features depend on."""
        return hashlib.sha256("\n".join([extractor.description, self.root, *self.lines]).encode()).hexdigest()

    def waveform(self, i: int) -> Tensor:
        rel, num_samples = self.lines[i].split("\t")
        return load_audio(f"{self.root}/{rel}", int(num_samples))


def read_shards(tsv_file, split: str, num_rank: int) -> List[Shard]:
    """The ``num_rank`` shards of a TSV file list (some may be empty when it has fewer lines)."""
    root, lines = read_tsv(tsv_file)
    return [Shard(split, rank, num_rank, root, lines[slice(*shard_range(len(lines), rank, num_rank))])
            for rank in range(1, num_rank + 1)]


@dataclass
class Extractor:
    """A feature type: waveform (N,) -> features (T, D), the width D, the frame count T of N samples (known
    before extraction, so shard files are written with their final shape), and a description that goes
    into the shard hash (so another checkpoint or layer recomputes the shards)."""
    extract: Callable[[Tensor], Tensor]
    dim: int
    description: str
    frames: Callable[[int], int]


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

    return Extractor(extract, 39, "mfcc", lambda num_samples: (num_samples - 400) // 160 + 1)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hubert_extractor(checkpoint_path, layer_index: int, device) -> Extractor:
    """Output of transformer layer ``layer_index`` (1-based; 0: the transformer's input) of a pre-trained
    model → (T, D) at 50 Hz, T = floor((N - 400) / 320) + 1. Unlike upstream the model is in eval mode (no
    dropout), so the features are deterministic."""
    model = load_pretrained_model(checkpoint_path, map_location="cpu")
    num_layers = model.config["encoder_num_layers"]
    if not 0 <= layer_index <= num_layers:
        raise ValueError(f"--layer-index {layer_index} is out of range: {checkpoint_path} has {num_layers} "
                         "transformer layers (1-based; 0 is their input)")
    if torch.device(device).type == "cuda":
        exact_fp32()
    wav2vec2 = model.wav2vec2.to(device).eval()
    description = f"hubert layer {layer_index} of checkpoint sha256 {file_sha256(checkpoint_path)}"
    return Extractor(lambda waveform: layer_features(wav2vec2, waveform, layer_index, device),
                     model.config["encoder_embed_dim"], description,
                     lambda num_samples: wav2vec2.feature_extractor.frame_lengths([num_samples])[0])


def layer_features(wav2vec2: nn.Module, waveform: Tensor, layer_index: int, device) -> Tensor:
    """(T, D) float32 on the CPU: layer ``layer_index`` of ``wav2vec2`` (on ``device``) for a (N,) waveform."""
    with torch.inference_mode():
        layers, _ = wav2vec2.extract_features(waveform[None].to(device), num_layers=layer_index)
    return layers[-1][0].float().cpu()


def feature_key(shard: Shard, extractor: Extractor, keep: Optional[Sequence[int]] = None) -> str:
    """Hash of a shard's feature file: the shard, and which of its utterances it holds (None: all)."""
    key = shard.key(extractor)
    return key if keep is None else hashlib.sha256(f"{key} keep {list(keep)}".encode()).hexdigest()


def dump_features(shard: Shard, feat_dir, extractor: Extractor, keep: Optional[Sequence[int]] = None) -> bool:
    """Extract the features of a shard's utterances (those at the sorted positions ``keep``, if given: the
    k-means sample) and stream them into its feature file; False if it was already done."""
    key = feature_key(shard, extractor, keep)
    if shard_is_done(feat_dir, shard.split, shard.rank, shard.num_rank, key):
        log.info("%s features are already done", shard.name)
        return False
    keep = range(len(shard.lines)) if keep is None else keep
    num_samples = shard.num_samples()
    lengths = [extractor.frames(num_samples[i]) for i in keep]
    features = (extractor.extract(shard.waveform(i)) for i in tqdm(keep, desc=f"{shard.name} features", unit="file"))
    write_shard(feat_dir, shard.split, shard.rank, shard.num_rank, features, lengths, extractor.dim, key)
    return True


def shard_features(shard: Shard, extractor: Extractor, feat_dir, keep: Optional[Sequence[int]] = None,
                   desc: str = "features") -> Iterator[Tensor]:
    """The features of every utterance of a shard, in order: read from its feature file where that holds them
    (as ``dump_features(shard, feat_dir, extractor, keep)`` wrote it), extracted otherwise."""
    stored = shard_is_done(feat_dir, shard.split, shard.rank, shard.num_rank, feature_key(shard, extractor, keep))
    kept = (set(range(len(shard.lines))) if keep is None else set(keep)) if stored else set()
    with ExitStack() as stack:
        if kept:
            reader = stack.enter_context(ShardReader(feat_dir, shard.split, shard.rank, shard.num_rank))
            lengths = iter(reader.lengths.tolist())
        for i in tqdm(range(len(shard.lines)), desc=f"{shard.name} {desc}", unit="file"):
            yield reader.read(next(lengths)) if i in kept else extractor.extract(shard.waveform(i))
