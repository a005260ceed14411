"""utils/ctc.py: the vocabulary, greedy decoding of known emissions, and error rates of known pairs."""
import re

import pytest
import torch

from utils.ctc import BLANK, VOCAB, ErrorCounts, encode, greedy_decode, ids_to_text, read_vocab, spells_words


def test_vocabulary_is_torchaudios_hubert_asr_labels():
    import torchaudio

    assert VOCAB == tuple(torchaudio.pipelines.HUBERT_ASR_LARGE.get_labels())
    assert VOCAB[BLANK] == "-" and VOCAB[1] == "|"


def test_encode_joins_words_with_bars_and_ends_with_one():
    ids = encode("  it's   a cat ")
    assert "".join(VOCAB[i] for i in ids) == "IT'S|A|CAT|"
    assert ids_to_text(ids) == "IT'S A CAT"
    with pytest.raises(ValueError, match=r"'1\?' are not in the CTC vocabulary"):
        encode("no? 1")


def emission_of(frames: str) -> torch.Tensor:
    """A (T, V) emission whose best path spells ``frames`` (one character per frame, '-' = blank)."""
    emission = torch.full((len(frames), len(VOCAB)), -5.0)
    for t, c in enumerate(frames):
        emission[t, VOCAB.index(c)] = 0.0
    return emission


def test_greedy_decode_merges_repeats_and_drops_blanks():
    # "HELLO": the double L needs a blank between; repeats of one letter merge; | is the space.
    assert greedy_decode(emission_of("--HH-EE-L-LL-OO||--WW-O-R-L-DD|")) == "HELLO WORLD"
    assert greedy_decode(emission_of("HELO")) == "HELO"
    assert greedy_decode(emission_of("--HI|THERE---"), length=4) == "HI"  # frames past the length are padding
    assert greedy_decode(emission_of("----")) == ""


def test_error_rates_of_known_pairs():
    counts = ErrorCounts().add("the cat sat", "the bat sat down")
    # words: cat->bat, +down = 2 of 3; characters: c->b, + " DOWN" = 6 of 11 ("THE CAT SAT")
    assert (counts.word_errors, counts.words, counts.char_errors, counts.chars) == (2, 3, 6, 11)
    counts.add("A B", "")  # a deletion of everything
    assert counts.wer == pytest.approx(4 / 5) and counts.cer == pytest.approx(9 / 14)
    assert ErrorCounts().add("Same  words", "SAME WORDS").wer == 0.0


def test_a_token_vocabulary_reads_space_separated_tokens(tmp_path):
    (tmp_path / "phones.txt").write_text("sh\niy\n\nhh\nae\nd\n")
    phones = read_vocab(tmp_path / "phones.txt")
    assert phones == ("-", "SH", "IY", "HH", "AE", "D") and not spells_words(phones) and spells_words(VOCAB)
    ids = encode(" sh iy  hh ae d ", phones)
    assert ids == [1, 2, 3, 4, 5] and ids_to_text([0, 1, 2, 0, 5], phones) == "SH IY D"
    with pytest.raises(ValueError, match=r"tokens \['AA', 'SHIY'\] are not in the CTC vocabulary"):
        encode("shiy aa d", phones)
    emission = torch.full((6, len(phones)), -5.0)
    for t, i in enumerate([1, 1, 0, 1, 5, 5]):  # a token twice needs a blank between, as a letter does
        emission[t, i] = 0.0
    assert greedy_decode(emission, vocab=phones) == "SH SH D"
    assert ErrorCounts().add("SH IY D", "SH D").wer == pytest.approx(1 / 3)  # the phone error rate
    for bad, wrong in (("aa\nb\nAA\n", "AA"), ("aa\n|\n", "|"), ("a b\n", "A B"), ("-\n", "-"), ("\n", "no tokens")):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(ValueError, match=f"bad.txt: expected one token per line.*{re.escape(wrong)}"):
            read_vocab(tmp_path / "bad.txt")
