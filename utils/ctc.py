"""CTC vocabularies, text <-> token ids, greedy decoding and error rates (CER, WER).

The default vocabulary is torchaudio's ``HUBERT_ASR_LARGE.get_labels()`` (what upstream's fine-tuning uses):
29 tokens, the CTC blank ``-`` first, ``|`` between words, then upper-case letters and the apostrophe; it
spells words letter by letter. A token vocabulary (``read_vocab``: phones, say) has no ``|``: transcripts
list its tokens separated by spaces, and the word error rate is then the token (phone) error rate.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torchaudio
from torch import Tensor

VOCAB = ("-", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G", "Y", "P",
         "B", "V", "K", "'", "X", "J", "Q", "Z")
BLANK, WORD_SEP = 0, 1


def normalise(text: str) -> str:
    """Upper case, single spaces: the form transcripts are compared in."""
    return " ".join(text.upper().split())


def spells_words(vocab: Sequence[str]) -> bool:
    """A character vocabulary (``|`` between words), as opposed to a token vocabulary."""
    return len(vocab) > WORD_SEP and vocab[WORD_SEP] == "|"


def read_vocab(path) -> Tuple[str, ...]:
    """A token vocabulary from a file of one token per line (upper-cased, as transcripts are compared), the CTC
    blank ``-`` put first. Duplicates, ``-`` and ``|`` are errors naming the file."""
    tokens = [line.strip().upper() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = sorted({t for t in tokens if tokens.count(t) > 1 or t in ("-", "|") or len(t.split()) > 1})
    if bad or not tokens:
        raise ValueError(f"{path}: expected one token per line, each once, none of '-' (the blank), '|' (the "
                         f"character vocabulary's word separator) or spaces; wrong: {bad or 'no tokens'}")
    return ("-", *tokens)


def encode(text: str, vocab: Sequence[str] = VOCAB) -> List[int]:
    """Token ids of a transcript: with a character vocabulary words joined by ``|`` and a final ``|`` (as
    upstream's collate), with a token vocabulary its space-separated tokens. A character or token outside the
    vocabulary raises ValueError naming it."""
    index = {t: i for i, t in enumerate(vocab)}
    if not spells_words(vocab):
        tokens = normalise(text).split()
        unknown = sorted({t for t in tokens if t not in index})
        if unknown:
            raise ValueError(f"tokens {unknown} are not in the CTC vocabulary {list(vocab[1:])}")
        return [index[t] for t in tokens]
    chars = "|".join(normalise(text).split()) + "|"
    unknown = sorted({c for c in chars if c not in index})
    if unknown:
        raise ValueError(f"characters {''.join(unknown)!r} are not in the CTC vocabulary {''.join(vocab[1:])!r}")
    return [index[c] for c in chars]


def ids_to_text(ids: Sequence[int], vocab: Sequence[str] = VOCAB) -> str:
    """Tokens to words: blanks dropped, ``|`` becomes a space (a token vocabulary: tokens separated by spaces)."""
    if not spells_words(vocab):
        return " ".join(vocab[i] for i in ids if i != BLANK)
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
