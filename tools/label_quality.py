"""Phone purity, cluster purity and PNMI of k-means labels against phone alignments.

Example, for MFCC labels of the demo corpus:

    python tools/label_quality.py --tsv exp/data/mfcc/tsv/librispeech_train.tsv \
        --labels exp/data/mfcc/label/label_train.pt --alignments demo_data/alignments/*.tsv

Definitions and the 50/100 Hz handling are documented in utils/label_quality.py.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from utils.label_quality import measure

COLUMNS = [("frames", "frames", "d"), ("phones", "num_phones", "d"), ("clusters", "num_clusters", "d"),
           ("phone_pur", "phone_purity", ".3f"), ("cluster_pur", "cluster_purity", ".3f"),
           ("PNMI", "pnmi", ".3f"), ("H(phone)", "h_phone", ".3f"), ("H(label)", "h_label", ".3f")]


def table(quality):
    """The metrics as a two-line, column-aligned table."""
    header = [name for name, _, _ in COLUMNS]
    values = [format(getattr(quality, field), fmt) for _, field, fmt in COLUMNS]
    widths = [max(len(h), len(v)) for h, v in zip(header, values)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in (header, values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tsv", required=True, help="preprocess TSV (line 1 root, then path\\tsamples)")
    parser.add_argument("--labels", required=True, help="label file, one line of ints per TSV utterance")
    parser.add_argument("--alignments", required=True, nargs="+",
                        help="'<utt-id>\\t<phone> ...' files at 100 frames/s")
    parser.add_argument("--label-rate", type=int, choices=[50, 100], default=None,
                        help="label frames per second; detected from the TSV lengths if omitted")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    try:
        quality = measure(args.tsv, args.labels, args.alignments, args.label_rate)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(quality.to_dict()))
    else:
        print(table(quality))
        print(f"{quality.utterances} utterances, labels at {quality.label_rate} Hz, "
              f"PNMI {quality.pnmi:.3f} (entropies in nats)")


if __name__ == "__main__":
    main()
