"""Which layer should the next iteration cluster? k-means on every transformer layer of a checkpoint, fitted
on training utterances and scored on held-out audio with phone alignments (PNMI, purities; see
utils/label_quality.py). The paper picks layer 6 of Base this way (HuBERT §V-C).

    python tools/layer_quality.py --checkpoint CKPT --tsv exp/data/mfcc/tsv/librispeech_train.tsv \\
        --audio-dir demo_data/LibriSpeech/dev-clean --alignments demo_data/alignments/dev-clean.tsv

Each layer's k-means is upstream's MiniBatchKMeans fitted on every frame of the listed utterances, as
``preprocess.py --feat-type hubert --percent -1`` would fit it. ``--layer-norm`` normalises each frame
(zero mean, unit variance over channels) before k-means: pre-LN models (tiny, Large) keep an unnormalised
residual stream, whose largest channels would otherwise decide the clusters. ``--concat`` also clusters every
layer's frame side by side. ``--input`` also scores the transformer's input (CNN, projection, positional conv:
on real speech the tiny model's most phonetic representation, docs/real_speech.md) as layer 0.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Sequence

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from utils.checkpoint import load_pretrained_model  # noqa: E402
from utils.common_utils import list_audio  # noqa: E402
from utils.feature_utils import load_audio, read_tsv  # noqa: E402
from utils.kmeans import fit_kmeans, predict  # noqa: E402
from utils.label_quality import measure_arrays, read_alignments  # noqa: E402


def tsv_files(tsv) -> List[str]:
    """The audio paths a preprocess.py file list names."""
    root, lines = read_tsv(tsv)
    return [f"{root}/{line.split(chr(9))[0]}" for line in lines]


def layer_features(model, files: Sequence, layer_norm: bool = False,
                   with_input: bool = False) -> List[List[torch.Tensor]]:
    """Every transformer layer's output for each file: a list over layers of a list over files of (T, D);
    ``with_input`` puts the transformer's input (CNN, projection, positional conv) first."""
    per_layer, inputs = None, []
    first = model.wav2vec2.encoder.transformer.layers[0]
    hook = first.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) if with_input else None
    try:  # an unreadable file must not leave the hook on the caller's model
        with torch.inference_mode():
            for path in files:
                layers, _ = model.wav2vec2.extract_features(load_audio(path)[None])
                layers = [inputs.pop(), *layers] if with_input else layers
                per_layer = per_layer or [[] for _ in layers]
                for i, x in enumerate(layers):
                    per_layer[i].append(F.layer_norm(x[0], x.shape[-1:]) if layer_norm else x[0])
    finally:
        if hook is not None:
            hook.remove()
    return per_layer


def layer_quality(checkpoint, train_files: Sequence, audio_dir, alignment_paths: Sequence, num_cluster: int = 100,
                  layer_norm: bool = False, seed: int = 0, concat: bool = False,
                  with_input: bool = False) -> List[dict]:
    """Held-out label quality of k-means on each layer: [{"layer": 1, "pnmi": ..., ...}, ...], with
    ``with_input`` the transformer's input first as layer 0, and with ``concat`` one more entry,
    ``"layer": "all"``, for k-means on every scored layer's frame concatenated."""
    model = load_pretrained_model(checkpoint).eval()
    audio_dir = Path(audio_dir)
    held_out = [audio_dir / f for f in list_audio(audio_dir)]
    if not held_out:
        raise ValueError(f"no .flac files under {audio_dir}")
    alignments = read_alignments(alignment_paths)
    train_feats = layer_features(model, train_files, layer_norm, with_input)
    held_out_feats = layer_features(model, held_out, layer_norm, with_input)
    ids, num_samples = [f.stem for f in held_out], [len(load_audio(f)) for f in held_out]

    def score(layer, fit_on: List[torch.Tensor], score_on: List[torch.Tensor]) -> dict:
        km = fit_kmeans(torch.cat(fit_on).numpy(), num_cluster, seed=seed)
        centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float32)
        labels = [predict(x, centers).numpy() for x in score_on]
        quality = measure_arrays(ids, num_samples, labels, alignments, label_rate=50, source=audio_dir)
        print(f"layer {layer}: held-out PNMI {quality.pnmi:.3f}", flush=True)
        return {"layer": layer, "dims": fit_on[0].shape[-1], "pnmi": quality.pnmi,
                "phone_purity": quality.phone_purity, "cluster_purity": quality.cluster_purity}

    first = 0 if with_input else 1
    results = [score(layer, fit_on, score_on)
               for layer, (fit_on, score_on) in enumerate(zip(train_feats, held_out_feats), start=first)]
    if concat:
        results.append(score("all", [torch.cat(frames, dim=-1) for frames in zip(*train_feats)],
                             [torch.cat(frames, dim=-1) for frames in zip(*held_out_feats)]))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train.py checkpoint (or exported state dict)")
    p.add_argument("--tsv", required=True, help="file list of the utterances k-means is fitted on")
    p.add_argument("--audio-dir", required=True, help="held-out audio, searched for *.flac")
    p.add_argument("--alignments", required=True, nargs="+", help="'<utt-id>\\t<phone> ...' files at 100 Hz")
    p.add_argument("--num-cluster", type=int, default=100)
    p.add_argument("--layer-norm", action="store_true", help="normalise each frame before k-means")
    p.add_argument("--concat", action="store_true", help="also k-means on all layers concatenated per frame")
    p.add_argument("--input", action="store_true", help="also the transformer's input, as layer 0")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    args = p.parse_args(argv)
    try:
        results = layer_quality(args.checkpoint, tsv_files(args.tsv), args.audio_dir, args.alignments,
                                args.num_cluster, args.layer_norm, concat=args.concat, with_input=args.input)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
