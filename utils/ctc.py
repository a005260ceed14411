"""CTC characters: the vocabulary, text <-> token ids, greedy decoding and error rates (CER, WER).

The vocabulary is torchaudio's ``HUBERT_ASR_LARGE.get_labels()`` (what upstream's fine-tuning uses): 29
tokens, the CTC blank ``-`` first, ``|`` between words, then upper-case letters and the apostrophe.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torchaudio
from torch import Tensor

VOCAB = ("-", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G", "Y", "P",
         "B", "V", "K", "'", "X", "J", "Q", "Z")
BLANK, WORD_SEP = 0, 1


def normalise(text: str) -> str:
    """Upper case, single spaces: the form transcripts are compared in."""
    return " ".join(text.upper().split())


def encode(text: str, vocab: Sequence[str] = VOCAB) -> List[int]:
    """Token ids of a transcript, words joined by ``|`` and a final ``|`` (as upstream's collate).
    A character outside the vocabulary raises ValueError naming it."""
    index = {t: i for i, t in enumerate(vocab)}
    chars = "|".join(normalise(text).split()) + "|"
    unknown = sorted({c for c in chars if c not in index})
    if unknown:
        raise ValueError(f"characters {''.join(unknown)!r} are not in the CTC vocabulary {''.join(vocab[1:])!r}")
    return [index[c] for c in chars]


def ids_to_text(ids: Sequence[int], vocab: Sequence[str] = VOCAB) -> str:
    """Tokens to words: blanks dropped, ``|`` becomes a space."""
    return " ".join("".join(vocab[i] for i in ids if i != BLANK).replace(vocab[WORD_SEP], " ").split())


def greedy_decode(emission: Tensor, length: Optional[int] = None, vocab: Sequence[str] = VOCAB) -> str:
    """Best path of one utterance's emission ``(T, V)``: argmax per frame, repeats merged, blanks dropped."""
    best = emission[:length].argmax(-1).unique_consecutive()
    return ids_to_text(best.tolist(), vocab)


@dataclass
class ErrorCounts:
    """Edit distances and reference lengths, summed over utterances (so rates are corpus-level)."""
    char_errors: int = 0
    chars: int = 0
    word_errors: int = 0
    words: int = 0

    def add(self, reference: str, hypothesis: str) -> "ErrorCounts":
        ref, hyp = normalise(reference), normalise(hypothesis)
        self.char_errors += torchaudio.functional.edit_distance(ref, hyp)
        self.chars += len(ref)
        self.word_errors += torchaudio.functional.edit_distance(ref.split(), hyp.split())
        self.words += len(ref.split())
        return self

    @property
    def cer(self) -> float:
        return self.char_errors / max(self.chars, 1)

    @property
    def wer(self) -> float:
        return self.word_errors / max(self.words, 1)
