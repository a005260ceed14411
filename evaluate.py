"""Word and character error rates of a fine-tuned HuBERT: greedy CTC decoding, or beam search with a KenLM
language model (torchaudio's ctc_decoder; needs `pip install flashlight-text`).

    python evaluate.py --checkpoint exp_finetune/checkpoints_hubert_pretrain_base/last.ckpt \\
        --librispeech-path /data/LibriSpeech --split dev-clean dev-other test-clean test-other
    # with a 4-gram LM: files you provide (e.g. torchaudio's librispeech-4-gram lexicon.txt, tokens.txt, lm.bin)
    python evaluate.py ... --use-lm --lexicon lexicon.txt --tokens tokens.txt --lm lm.bin
    # any transcribed LibriSpeech-layout folder (here the demo corpus's held-out speakers):
    python evaluate.py --checkpoint ... --data-dir demo_data/LibriSpeech/dev-clean

--checkpoint is a finetune.py checkpoint (or upstream's: the 29 torchaudio characters are assumed) or an
export.py --torchaudio file of one. Each utterance is decoded alone, as upstream (a group-norm extractor
normalises over the whole input, so padding would change the emissions). Prints WER and CER per subset and
writes <out-dir>/<subset>.tsv: utterance id, reference, hypothesis.
"""
import argparse
import logging
import time
from pathlib import Path
from typing import Callable, List, Sequence

import torch
from tqdm import tqdm

from dataset import find_subset, list_utterances
from utils.checkpoint import load_finetuned_model
from utils.common_utils import atomic_write
from utils.ctc import VOCAB, ErrorCounts, greedy_decode, normalise, spells_words
from utils.device import cuda_hint
from utils.feature_utils import load_audio

log = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", type=Path, required=True, help="finetune.py checkpoint or export.py --torchaudio file")
    a("--librispeech-path", type=Path, default=None, help="folder with the LibriSpeech subsets")
    a("--split", nargs="+", default=["test-clean"], help="subsets under --librispeech-path (dev-clean dev-other ...)")
    a("--data-dir", type=Path, action="append", default=None, metavar="DIR",
      help="a transcribed LibriSpeech-layout folder to evaluate instead of --split (repeatable)")
    a("--out-dir", type=Path, default=Path("exp_eval"), help="hypotheses go here, one TSV per subset")
    a("--use-lm", action="store_true", help="beam search with the --lexicon, --tokens and --lm files")
    a("--lexicon", type=Path, help="word -> spelling file (flashlight format), words outside it are not output")
    a("--tokens", type=Path, help="the model's tokens, one per line, in the order of its outputs")
    a("--lm", type=Path, help="KenLM language model (ARPA or binary)")
    a("--nbest", type=int, default=1, help="hypotheses kept by the beam search (the best is scored)")
    a("--beam-size", type=int, default=1500)
    a("--beam-size-token", type=int, default=None, help="tokens considered per step (default: all)")
    a("--beam-threshold", type=float, default=100)
    a("--lm-weight", type=float, default=2.46)
    a("--word-score", type=float, default=-0.59)
    a("--unk-score", type=float, default=float("-inf"))
    a("--sil-score", type=float, default=0.0)
    a("--use-gpu", action="store_true", help="run the model on CUDA")
    a("--debug", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.data_dir is None and args.librispeech_path is None:
        p.error("give --librispeech-path (with --split) or --data-dir")
    if args.use_lm and None in (args.lexicon, args.tokens, args.lm):
        p.error("--use-lm needs --lexicon, --tokens and --lm (nothing is downloaded)")
    return args


def lm_decoder(args, vocab: Sequence[str]) -> Callable[[torch.Tensor], str]:
    """Beam search with a KenLM model over ``(T, V)`` log-probabilities, returning the best words."""
    if not spells_words(vocab):
        raise SystemExit(f"evaluate.py: error: --use-lm needs a model that spells words (its vocabulary has '|'); "
                         f"{args.checkpoint} outputs the tokens {list(vocab[1:])}")
    try:
        from torchaudio.models.decoder import ctc_decoder
    except (ImportError, RuntimeError) as e:
        raise SystemExit(f"evaluate.py: error: --use-lm needs torchaudio's CTC decoder, which needs the "
                         f"flashlight-text package: pip install flashlight-text ({e})") from e
    for path in (args.lexicon, args.tokens, args.lm):
        if not path.is_file():
            raise SystemExit(f"evaluate.py: error: {path} does not exist")
    tokens = [line.strip() for line in args.tokens.read_text().splitlines() if line.strip()]
    if [t.upper() for t in tokens] != [t.upper() for t in vocab]:
        raise SystemExit(f"evaluate.py: error: {args.tokens} lists {len(tokens)} tokens {''.join(tokens)!r}, but the "
                         f"model outputs {len(vocab)} tokens in the order {''.join(vocab)!r}")
    decoder = ctc_decoder(lexicon=str(args.lexicon), tokens=str(args.tokens), lm=str(args.lm), nbest=args.nbest,
                          beam_size=args.beam_size, beam_size_token=args.beam_size_token,
                          beam_threshold=args.beam_threshold, lm_weight=args.lm_weight, word_score=args.word_score,
                          unk_score=args.unk_score, sil_score=args.sil_score, blank_token=tokens[0],
                          sil_token=tokens[1])

    def decode(log_probs: torch.Tensor) -> str:
        return " ".join(decoder(log_probs[None].float().cpu().contiguous())[0][0].words)

    return decode


def evaluate_folder(model, folder: Path, decode: Callable[[torch.Tensor], str], device: str,
                    vocab: Sequence[str] = VOCAB):
    """(ErrorCounts, [(utterance id, reference, hypothesis)]) of every utterance under ``folder``, whose
    transcripts are in ``vocab`` (with a token vocabulary the WER is the token error rate)."""
    counts, rows = ErrorCounts(), []
    for u in tqdm(list_utterances([folder], vocab=vocab), desc=f"decoding {folder.name}", unit="utt"):
        with torch.inference_mode():
            emission, _ = model(load_audio(u.path)[None].to(device))
        hypothesis = normalise(decode(torch.log_softmax(emission[0].float(), dim=-1)))
        counts.add(u.transcript, hypothesis)
        rows.append((u.utt_id, normalise(u.transcript), hypothesis))
    return counts, rows


def main(argv=None) -> List[tuple]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO)
    device = "cuda" if args.use_gpu else "cpu"
    if args.use_gpu and not torch.cuda.is_available():
        raise SystemExit(f"evaluate.py: error: --use-gpu, but torch sees no CUDA GPU{cuda_hint()}")
    try:
        model, vocab = load_finetuned_model(args.checkpoint)
        subsets = ([(d.name, d) for d in args.data_dir] if args.data_dir else
                   [(split, find_subset(args.librispeech_path, split)) for split in args.split])
    except (OSError, ValueError) as e:
        raise SystemExit(f"evaluate.py: error: {e}") from e
    model = model.eval().to(device)
    decode = lm_decoder(args, vocab) if args.use_lm else (lambda log_probs: greedy_decode(log_probs, vocab=vocab))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, folder in subsets:
        start = time.perf_counter()
        counts, rows = evaluate_folder(model, folder, decode, device, vocab)
        out = args.out_dir / f"{name}.tsv"
        with atomic_write(out, "w") as f:
            f.write("id\treference\thypothesis\n")
            f.writelines(f"{utt_id}\t{ref}\t{hyp}\n" for utt_id, ref, hyp in rows)
        print(f"{name}: {len(rows)} utterances, WER {100 * counts.wer:.2f} %, CER {100 * counts.cer:.2f} % "
              f"({'KenLM beam search' if args.use_lm else 'greedy'}, {time.perf_counter() - start:.0f} s); "
              f"hypotheses in {out}")
        results.append((name, len(rows), counts.wer, counts.cer, out))
    print(f"{'subset':<16}{'utts':>6}{'WER %':>8}{'CER %':>8}")
    for name, n, wer, cer, _ in results:
        print(f"{name:<16}{n:>6}{100 * wer:>8.2f}{100 * cer:>8.2f}")
    return results


if __name__ == "__main__":
    main()
