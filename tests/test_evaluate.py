"""evaluate.py: greedy decoding of a fine-tuned checkpoint (and of its torchaudio export) cross-checked against
torchaudio's own model, and KenLM beam search through torchaudio's ctc_decoder (flashlight-text)."""
import csv
import sys

import pytest
import torch
import torchaudio

import evaluate
import export
from dataset import list_utterances
from tests.fixtures import make_transcribed_corpus, save_finetuned_checkpoint
from utils.ctc import VOCAB, ErrorCounts, greedy_decode
from utils.feature_utils import load_audio


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.mark.parametrize("use_conv2d", [False, True], ids=["conv1d", "conv2d"])
def test_greedy_wer_and_hypotheses_match_torchaudios_model(tmp_path, capsys, use_conv2d):
    corpus = make_transcribed_corpus(tmp_path / "dev-clean", n_utts=3)
    ckpt = save_finetuned_checkpoint(tmp_path / "ft.ckpt", use_conv2d=use_conv2d)
    export.main(["--checkpoint", str(ckpt), "--torchaudio", str(tmp_path / "ta.pt")])
    results = evaluate.main(["--checkpoint", str(ckpt), "--data-dir", str(corpus), "--out-dir", str(tmp_path / "ev")])
    from_export = evaluate.main(["--checkpoint", str(tmp_path / "ta.pt"), "--librispeech-path", str(tmp_path),
                                 "--split", "dev-clean", "--out-dir", str(tmp_path / "ev2")])
    rows = read_rows(tmp_path / "ev" / "dev-clean.tsv")
    assert rows == read_rows(tmp_path / "ev2" / "dev-clean.tsv") and results[0][:4] == from_export[0][:4]

    obj = torch.load(tmp_path / "ta.pt", weights_only=True)
    reference = torchaudio.models.wav2vec2_model(**obj["config"]).eval()
    reference.load_state_dict(obj["state_dict"])
    counts = ErrorCounts()
    for u, row in zip(list_utterances([corpus]), rows):
        with torch.no_grad():
            emission = reference(load_audio(u.path)[None])[0][0]
        assert (row["id"], row["reference"], row["hypothesis"]) == (u.utt_id, u.transcript, greedy_decode(emission))
        counts.add(u.transcript, row["hypothesis"])
    name, count, wer, cer, _ = results[0]
    assert (name, count, wer, cer) == ("dev-clean", 3, counts.wer, counts.cer)
    assert f"dev-clean: 3 utterances, WER {100 * wer:.2f} %" in capsys.readouterr().out


def write_lm_files(folder):
    """Tokens in the model's order, a three-word lexicon and a bigram ARPA model that strongly prefers 'CAT'."""
    (folder / "tokens.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "lexicon.txt").write_text("CAT C A T |\nBAT B A T |\nCAB C A B |\n")
    unigrams = [("<unk>", -1.0, 0), ("<s>", -1.0, -0.3), ("</s>", -1.0, 0), ("CAT", -0.5, -0.3), ("BAT", -2.0, -0.3),
                ("CAB", -2.0, -0.3)]
    lines = ["\\data\\", f"ngram 1={len(unigrams)}", "ngram 2=2", "", "\\1-grams:"]
    lines += [f"{p}\t{w}\t{b}" for w, p, b in unigrams]
    lines += ["", "\\2-grams:", "-0.1\t<s> CAT", "-0.1\tCAT </s>", "", "\\end\\", ""]
    (folder / "lm.arpa").write_text("\n".join(lines))


def known_emission():
    """Log-probabilities whose best path reads 'BAT', with 'C' a close second on the first letter."""
    emission = torch.full((6, len(VOCAB)), -10.0)
    emission[0, VOCAB.index("B")], emission[0, VOCAB.index("C")] = -0.6, -0.8
    for t, c in enumerate("-A-T|", start=1):
        emission[t, VOCAB.index(c)] = -0.1
    return emission.log_softmax(-1)


def test_kenlm_beam_search_lets_the_language_model_correct_a_letter(tmp_path):
    write_lm_files(tmp_path)
    args = evaluate.parse_args(["--checkpoint", "x", "--data-dir", "y", "--use-lm", "--lexicon",
                                str(tmp_path / "lexicon.txt"), "--tokens", str(tmp_path / "tokens.txt"),
                                "--lm", str(tmp_path / "lm.arpa"), "--beam-size", "50", "--lm-weight", "2",
                                "--word-score", "0"])
    emission = known_emission()
    assert greedy_decode(emission) == "BAT"
    assert evaluate.lm_decoder(args, VOCAB)(emission) == "CAT"
    args.lm_weight = 0.0  # without the LM the lexicon-constrained search reads what it hears
    assert evaluate.lm_decoder(args, VOCAB)(emission) == "BAT"

    (tmp_path / "tokens.txt").write_text("\n".join(reversed(VOCAB)) + "\n")
    with pytest.raises(SystemExit, match="but the model outputs 29 tokens in the order"):
        evaluate.lm_decoder(args, VOCAB)


def test_missing_decoder_package_and_files_give_clear_errors(tmp_path, monkeypatch):
    write_lm_files(tmp_path)
    with pytest.raises(SystemExit):  # argparse: --use-lm without its files
        evaluate.parse_args(["--checkpoint", "x", "--data-dir", "y", "--use-lm"])
    args = evaluate.parse_args(["--checkpoint", "x", "--data-dir", "y", "--use-lm", "--lexicon",
                                str(tmp_path / "lexicon.txt"), "--tokens", str(tmp_path / "tokens.txt"),
                                "--lm", str(tmp_path / "missing.arpa")])
    with pytest.raises(SystemExit, match="missing.arpa does not exist"):
        evaluate.lm_decoder(args, VOCAB)
    # As on a machine without flashlight-text.
    import torchaudio.models.decoder as decoder

    monkeypatch.setitem(sys.modules, "flashlight.lib.text.decoder", None)
    monkeypatch.delitem(sys.modules, "torchaudio.models.decoder._ctc_decoder", raising=False)
    monkeypatch.delattr(decoder, "ctc_decoder", raising=False)
    monkeypatch.delattr(decoder, "_ctc_decoder", raising=False)
    with pytest.raises(SystemExit, match="pip install flashlight-text"):
        evaluate.lm_decoder(args, VOCAB)
    with pytest.raises(SystemExit, match=rf"--use-gpu, but torch sees no CUDA GPU .*CUDA {torch.version.cuda}"):
        evaluate.main(["--checkpoint", "x", "--data-dir", str(tmp_path), "--use-gpu"])  # checked first
    with pytest.raises(SystemExit, match="has no CTC head"):
        pretrained = tmp_path / "pre.ckpt"
        torch.save({"state_dict": {}}, pretrained)
        evaluate.main(["--checkpoint", str(pretrained), "--data-dir", str(tmp_path)])
