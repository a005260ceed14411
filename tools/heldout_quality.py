"""Label quality on speakers the k-means never saw: label a folder of audio with a fitted k-means model
and score the labels against phone alignments (purity, PNMI; see utils/label_quality.py).

    # MFCC k-means of the demo run, on the held-out demo speakers
    python tools/heldout_quality.py --data-dir exp/data/mfcc \\
        --audio-dir demo_data/LibriSpeech/dev-clean --alignments demo_data/alignments/dev-clean.tsv
    # k-means on layer 3 of a checkpoint (the data dir made by preprocess.py --feat-type hubert --layer-index 3)
    python tools/heldout_quality.py --data-dir exp/data/hubert_3 --checkpoint-path CKPT --layer-index 3 ...
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from utils.common_utils import list_audio
from utils.feature_utils import Extractor, hubert_extractor, load_audio, mfcc_extractor
from utils.kmeans import load_centers, predict
from utils.label_quality import LabelQuality, measure_arrays, read_alignments


def label_folder(data_dir, audio_dir, extractor: Extractor, device="cpu") -> Tuple[List[Path], List[int], list]:
    """(files relative to ``audio_dir``, their sample counts, their frame labels) for every .flac under
    ``audio_dir``, labelled with the k-means model of ``data_dir`` (``km_model/model.npy``)."""
    centers = load_centers(Path(data_dir) / "km_model", device)
    if centers.shape[1] != extractor.dim:
        raise ValueError(f"{data_dir}/km_model/model.npy has {centers.shape[1]}-dim centres but the features "
                         f"({extractor.description}) are {extractor.dim}-dim")
    files = list_audio(Path(audio_dir))
    if not files:
        raise ValueError(f"no .flac files under {audio_dir}")
    num_samples, labels = [], []
    for rel in files:
        waveform = load_audio(Path(audio_dir) / rel)
        num_samples.append(len(waveform))
        labels.append(predict(extractor.extract(waveform), centers).numpy())
    return files, num_samples, labels


def heldout_quality(data_dir, audio_dir, alignment_paths, extractor: Extractor, device="cpu") -> LabelQuality:
    """Quality of the labels that ``data_dir/km_model/model.npy`` gives every file under ``audio_dir``."""
    files, num_samples, labels = label_folder(data_dir, audio_dir, extractor, device)
    rate = 100 if extractor.description == "mfcc" else 50
    return measure_arrays([f.stem for f in files], num_samples, labels, read_alignments(alignment_paths), rate,
                          source=audio_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="preprocess.py output folder with km_model/model.npy")
    p.add_argument("--audio-dir", required=True, help="folder searched for *.flac (the held-out speakers)")
    p.add_argument("--alignments", required=True, nargs="+", help="'<utt-id>\\t<phone> ...' files at 100 Hz")
    p.add_argument("--checkpoint-path", default=None, help="model of HuBERT-layer features (else MFCC)")
    p.add_argument("--layer-index", type=int, default=6, help="transformer layer (1-based; 0: its input)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    extractor = (hubert_extractor(args.checkpoint_path, args.layer_index, args.device) if args.checkpoint_path
                 else mfcc_extractor())
    try:
        quality = heldout_quality(args.data_dir, args.audio_dir, args.alignments, extractor, args.device)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(quality.to_dict()))
    else:
        print(f"{quality.utterances} held-out utterances, {quality.frames} frames, {quality.num_clusters} clusters: "
              f"phone purity {quality.phone_purity:.3f}, cluster purity {quality.cluster_purity:.3f}, "
              f"PNMI {quality.pnmi:.3f}")
    return quality


if __name__ == "__main__":
    main()
