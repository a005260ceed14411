"""Transcribed audio for CTC fine-tuning and evaluation (spec §4.7): LibriSpeech-layout folders, where
``<spk>/<chapter>/<spk>-<chapter>.trans.txt`` holds ``<utt-id> <TRANSCRIPT>`` lines beside the FLAC files
(LibriSpeech subsets, LibriLight-limited, our demo corpus)."""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from utils.common_utils import BadAudioError, audio_problem, load_audio
from utils.ctc import VOCAB, encode

# LibriLight-limited (librispeech_finetuning.tgz): folders of each subset, as torchaudio's LibriLightLimited.
LIBRILIGHT_SUBSETS = {"10min": ["1h/0"], "1h": ["1h/*"], "10h": ["1h/*", "9h"]}


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    path: str
    num_samples: int
    transcript: str


def find_subset(root: Union[str, Path], name: str) -> Path:
    """The folder of LibriSpeech subset ``name`` (e.g. dev-other) under ``root``: ``root/LibriSpeech/name``
    (torchaudio's layout), ``root/name``, or the first ``.../LibriSpeech/name`` below ``root`` (dataset_itr1.py
    writes ``<split>_extract/name/LibriSpeech/name``)."""
    root = Path(root)
    for folder in (root / "LibriSpeech" / name, root / name, *sorted(root.glob(f"**/LibriSpeech/{name}"))):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"no LibriSpeech subset {name!r} under {root} (looked for {root}/LibriSpeech/{name}, "
                            f"{root}/{name} and **/LibriSpeech/{name})")


def librilight_folders(root: Union[str, Path], subset: str) -> List[Path]:
    """The folders of a LibriLight-limited subset under ``root`` (the extracted ``librispeech_finetuning``
    folder, or any folder above it)."""
    if subset not in LIBRILIGHT_SUBSETS:
        raise ValueError(f"LibriLight-limited subset must be one of {sorted(LIBRILIGHT_SUBSETS)}, got {subset!r}")
    root = Path(root)
    candidates = [root] + sorted(root.glob("**/librispeech_finetuning"))
    base = next((c for c in candidates if (c / "1h").is_dir()), None)
    if base is None:
        raise FileNotFoundError(f"no LibriLight-limited data (a librispeech_finetuning folder with 1h/ and 9h/) under "
                                f"{root}; fetch it with dataset_itr1.py --librispeech_split librilight")
    folders = [f for pattern in LIBRILIGHT_SUBSETS[subset] for f in sorted(base.glob(pattern)) if f.is_dir()]
    if not folders:
        raise FileNotFoundError(f"{base} has none of {LIBRILIGHT_SUBSETS[subset]} (subset {subset})")
    return folders


def list_utterances(folders: Sequence[Union[str, Path]], extension: str = "flac",
                    vocab: Sequence[str] = VOCAB) -> List[Utterance]:
    """Every transcribed utterance under ``folders``, sorted by id; a transcript outside ``vocab`` is an error
    naming its line. Audio headers are checked first: one error lists every missing or unusable file (wrong
    rate, not mono, too short)."""
    utterances, problems = [], []
    for folder in folders:
        trans_files = sorted(Path(folder).glob("**/*.trans.txt"))
        if not trans_files:
            raise FileNotFoundError(f"{folder}: no *.trans.txt transcripts (expected a LibriSpeech-layout folder)")
        for trans in trans_files:
            for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                utt_id, _, text = line.strip().partition(" ")
                try:
                    encode(text, vocab)
                except ValueError as e:
                    raise ValueError(f"{trans}:{lineno}: {e}") from None
                path = trans.parent / f"{utt_id}.{extension}"
                if not path.is_file():
                    problems.append(f"  {path}: listed in {trans.name} but missing")
                    continue
                num_samples, problem = audio_problem(path)
                if problem:
                    problems.append(f"  {path}: {problem}")
                utterances.append(Utterance(utt_id, str(path), num_samples, " ".join(text.split())))
    if problems:
        raise BadAudioError(f"{len(problems)} unusable transcribed utterance(s):\n" + "\n".join(problems))
    return sorted(utterances, key=lambda u: u.utt_id)


class TranscribedAudio(Dataset):
    """Items ``(waveform (N,) float32, token ids (L,) int64)`` of ``utterances``; ``lengths`` feed the sampler."""

    def __init__(self, utterances: Sequence[Utterance], vocab: Sequence[str] = VOCAB):
        if not utterances:
            raise ValueError("no utterances to load")
        self.utterances = list(utterances)
        self.vocab = tuple(vocab)
        self.lengths = np.array([u.num_samples for u in self.utterances], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        u = self.utterances[index]
        waveform = load_audio(u.path, u.num_samples, "its header when the utterances were listed")
        return waveform, torch.tensor(encode(u.transcript, self.vocab))


def collate_ctc(batch: List[Tuple[Tensor, Tensor]], generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(waveforms (B, N) zero-padded, labels (B, L) padded with -1, audio lengths (B,), label lengths (B,))``,
    as upstream's ``CollateFnLibriLightLimited``. Nothing is cropped, so ``generator`` (UpdateLoader's collate
    signature) is not used."""
    waveforms, labels = zip(*batch)
    return (pad_sequence(waveforms, batch_first=True), pad_sequence(labels, batch_first=True, padding_value=-1),
            torch.tensor([len(w) for w in waveforms]), torch.tensor([len(t) for t in labels]))
