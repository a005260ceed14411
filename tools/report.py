"""Is my run healthy? Findings and curves of train.py / finetune.py runs, afterwards.

    python tools/report.py RUN_DIR [RUN_DIR ...] [--against TRUSTED_RUN_DIR ...]

RUN_DIR is a run's --exp-dir (all its Lightning log versions, i.e. every resume, stitched into one history).
Prints one line per finding with the update where it starts (or that there is none), writes RUN_DIR/report.html
(self-contained: opens offline) with every run given overlaid and the trusted runs' band, and exits 1 when there
are findings. Checks and thresholds: health/checks.py. Without --against, the trusted runs are those kept in
health/trusted/ (bench/trusted_runs.py) with the first RUN_DIR's recipe flags, if any.
"""
import argparse
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from health.checks import Finding, dataset_label_findings, history_findings, label_prior  # noqa: E402
from health.history import RunHistory, read_run  # noqa: E402
from health.report_html import render  # noqa: E402
from health.trusted import trusted_for  # noqa: E402
from utils.common_utils import atomic_write  # noqa: E402


def add_prior_ratios(h: RunHistory) -> None:
    """Masked accuracies over the label prior (of the valid split; a trusted copy keeps its own) as series of their
    own, for the page."""
    p = h.hparams
    if "label_prior" in p:
        prior = float(p["label_prior"])
    elif h.kind == "pretrain" and (Path(str(p.get("dataset_path", ""))) / "label").is_dir():
        prior = label_prior(p["dataset_path"], p["feature_type"])
    else:
        return
    for name in ("train_masked_accuracy", "val_masked_accuracy"):
        h.series[f"{name} / label prior"] = [(s, v / prior) for s, v in h.points(name)]


def findings(h: RunHistory, labels: bool = True) -> List[Finding]:
    """The history's findings, and for a pre-training run whose --dataset-path is here, its labels'."""
    found = history_findings(h)
    p = h.hparams
    if labels and h.kind == "pretrain" and Path(str(p.get("dataset_path", ""))).is_dir():
        found = dataset_label_findings(p["dataset_path"], p["feature_type"], int(p["num_classes"]),
                                       dataset=p.get("dataset", "librispeech")) + found
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--against", nargs="+", type=Path, default=None, metavar="TRUSTED_RUN_DIR",
                        help="runs to draw as the band of what is expected (default: health/trusted/'s runs of "
                             "the same recipe)")
    parser.add_argument("--no-labels", action="store_true", help="skip the label checks")
    args = parser.parse_args(argv)
    try:
        histories = [read_run(d) for d in args.run_dirs]
        trusted = trusted_for(histories[0]) if args.against is None else [read_run(d) for d in args.against]
    except (OSError, ValueError) as e:
        raise SystemExit(f"report.py: error: {e}")
    runs = [(str(d), h, findings(h, not args.no_labels)) for d, h in zip(args.run_dirs, histories)]
    for h in [*histories, *trusted]:
        if not args.no_labels:
            add_prior_ratios(h)
    page = render(runs, trusted)
    for name, h, found in runs:
        print(f"{name}: {len(found) or 'no'} finding(s) in {h.last_step + 1} updates "
              f"({len(h.versions)} log version(s))")
        for f in found:
            print(f"  {f.line()}")
        with atomic_write(h.run_dir / "report.html", "w") as out:
            out.write(page)
    print(f"wrote report.html in {', '.join(str(d) for d in args.run_dirs)}"
          + (f", against {len(trusted)} trusted run(s)" if trusted else ", no trusted runs of this recipe"))
    return 1 if any(found for _, _, found in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
