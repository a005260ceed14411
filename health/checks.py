"""Is a run healthy? Checks of a run's history (health.history) and of its labels, each finding named with the
update where it starts. Used live by health.callback.HealthCallback and afterwards by tools/report.py.

Thresholds (module constants, documented in the README):
- non-finite: any logged loss that is NaN or inf; skipped: any update skipped for a non-finite loss or gradient.
- spike: a training loss over SPIKE_FACTOR x the median of the SPIKE_WINDOW values logged before it (after the
  warm-up); divergence: the median of the last SPIKE_WINDOW values over DIVERGENCE_FACTOR x the lowest such median.
  Both per kind of run, set above what the trusted runs' healthy seeds reach (docs/trusted_runs.md): fine-tuning
  logs CTC loss per utterance, which moves with the batch's utterance lengths.
- accuracy falling: masked validation accuracy lower at FALLING_VALIDATIONS validations in a row, by
  FALLING_TOTAL in all (fine-tuning: the CER rising likewise).
- LR: a logged learning rate off the schedule the flags give by more than LR_TOLERANCE (relative).
- throughput: audio seconds per second under SLOW_FACTOR x the run's median for SLOW_POINTS logged points in a row.
- labels (on LABEL_SAMPLE utterances spread over the split): a cluster that never occurs (fewer clusters in use
  than --num-classes); one holding over DOMINANT_SHARE of the frames; ids beyond --num-classes; and, for every
  utterance, label counts that do not match the audio.
- end: the run stopped before --max-updates, or its newest checkpoint is missing.
"""
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from health.history import RunHistory

SPIKE_WINDOW = 10
SPIKE_FACTOR = {"pretrain": 1.8, "finetune": 2.5}
DIVERGENCE_FACTOR = {"pretrain": 1.3, "finetune": 1.6}
FALLING_VALIDATIONS, FALLING_TOTAL = 3, 0.01
LR_TOLERANCE = 0.02
SLOW_FACTOR, SLOW_POINTS = 0.5, 3
DOMINANT_SHARE = 0.3
LABEL_SAMPLE = 10_000  # utterances whose labels the cluster checks read


@dataclass(frozen=True)
class Finding:
    check: str
    step: int  # the update where it starts
    message: str

    def line(self) -> str:
        return f"update {self.step}: {self.check}: {self.message}"


def non_finite(h: RunHistory) -> List[Finding]:
    found = []
    for name in ("train_loss_step", "val_loss"):
        bad = [s for s, v in h.points(name) if not math.isfinite(v)]
        if bad:
            found.append(Finding("non-finite", bad[0], f"{name} is not finite at {len(bad)} logged point(s)"))
    skipped = [(s, v) for s, v in h.points("skipped_steps") if v > 0]
    if skipped:
        found.append(Finding("skipped", skipped[0][0], f"{int(skipped[-1][1])} update(s) skipped (a non-finite "
                                                       "loss or gradient on some rank)"))
    return found


def loss_spikes(h: RunHistory) -> List[Finding]:
    warmup = int(h.hparams.get("warmup_updates", 0))
    points = [(s, v) for s, v in h.points("train_loss_step") if math.isfinite(v)]
    found, medians = [], []
    spike, divergence = SPIKE_FACTOR[h.kind], DIVERGENCE_FACTOR[h.kind]
    for i in range(SPIKE_WINDOW, len(points)):
        median = statistics.median(v for _, v in points[i - SPIKE_WINDOW:i])
        medians.append(median)
        step, value = points[i]
        if step > warmup and value > spike * median and not any(f.check == "spike" for f in found):
            found.append(Finding("spike", step, f"train_loss_step {value:.3g} is {value / median:.1f}x the median "
                                                f"of the {SPIKE_WINDOW} values before it"))
    if medians and medians[-1] > divergence * min(medians):
        low = medians.index(min(medians)) + SPIKE_WINDOW
        found.append(Finding("divergence", points[low][0], f"training loss rose from a median of {min(medians):.3g} "
                                                           f"to {medians[-1]:.3g}"))
    return found


def falling(h: RunHistory) -> List[Finding]:
    name, worse = (("val_cer", lambda a, b: b > a) if h.kind == "finetune" else
                   ("val_masked_accuracy", lambda a, b: b < a))
    points = h.points(name)
    for i in range(len(points) - FALLING_VALIDATIONS):
        window = points[i:i + FALLING_VALIDATIONS + 1]
        if all(worse(a, b) for (_, a), (_, b) in zip(window, window[1:])) and \
                abs(window[-1][1] - window[0][1]) >= FALLING_TOTAL:
            return [Finding("accuracy falling", window[1][0], f"{name} went {window[0][1]:.4g} -> {window[-1][1]:.4g} "
                                                              f"over {FALLING_VALIDATIONS} validations")]
    return []


def schedule(h: RunHistory) -> Optional[Callable[[int], float]]:
    """The learning rate of update k (1-based) that the run's flags give, from the schedulers themselves."""
    from utils.lr_schedule import LinearDecayLRScheduler, TriStageLRScheduler

    p = h.hparams
    if "learning_rate" not in p:
        return None
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(p["learning_rate"]))
    if h.kind == "finetune":
        sched = TriStageLRScheduler(opt, p["warmup_updates"], p["hold_updates"], p["decay_updates"])
    else:
        sched = LinearDecayLRScheduler(opt, p["warmup_updates"], p["max_updates"])

    def lr(k: int) -> float:
        sched._step_count = k
        return sched.get_lr()[0]
    return lr


def lr_schedule(h: RunHistory) -> List[Finding]:
    lr = schedule(h)
    if lr is None:
        return []
    # The logging step counts skipped updates too, the schedule does not; a skipped update's row repeats the
    # LR logged before it.
    skipped = [s for s, _ in h.points("skipped_steps")]
    for step, value in h.points("lr"):  # logged before the update of step + 1 is made
        if step in skipped:
            continue
        want = lr(step + 1 - sum(s < step for s in skipped))
        if abs(value - want) > LR_TOLERANCE * max(abs(want), 1e-12):
            return [Finding("LR schedule", step, f"lr {value:.3g} where the flags' schedule gives {want:.3g}")]
    return []


def throughput(h: RunHistory) -> List[Finding]:
    points = h.points("audio_seconds_per_second")[1:]  # the first includes start-up
    if len(points) < SLOW_POINTS + 1:
        return []
    median = statistics.median(v for _, v in points)
    run = 0
    for i, (step, value) in enumerate(points):
        run = run + 1 if value < SLOW_FACTOR * median else 0
        if run == SLOW_POINTS:
            start = points[i - SLOW_POINTS + 1][0]
            return [Finding("throughput", start, f"audio s/s under {SLOW_FACTOR:g}x the run's median "
                                                 f"({median:.3g}) for {SLOW_POINTS} logged points in a row")]
    return []


def run_end(h: RunHistory) -> List[Finding]:
    found = []
    max_updates = h.hparams.get("max_updates")
    if max_updates and h.last_step + 1 < int(max_updates):
        found.append(Finding("ended early", h.last_step, f"last logged update {h.last_step + 1} of --max-updates "
                                                         f"{max_updates}"))
    ckpt_dirs = list(h.run_dir.glob("checkpoints_*"))
    if ckpt_dirs and not any((d / "last.ckpt").exists() for d in ckpt_dirs):  # a dangling link does not exist
        found.append(Finding("lost checkpoints", h.last_step, f"no readable last.ckpt in {ckpt_dirs[0]}"))
    return found


def history_findings(h: RunHistory, finished: bool = True) -> List[Finding]:
    """Every check of the history; ``finished=False`` (a live run) leaves out the end-of-run checks."""
    checks = [non_finite, loss_spikes, falling, lr_schedule, throughput] + ([run_end] if finished else [])
    return sorted((f for check in checks for f in check(h)), key=lambda f: f.step)


def spread(n: int, sample: int) -> np.ndarray:
    """Up to ``sample`` indices spread evenly over ``range(n)``."""
    return np.unique(np.linspace(0, n - 1, min(sample, n)).astype(np.int64))


def label_findings(labels, num_classes: int, num_frames: Optional[np.ndarray] = None, source: str = "labels",
                   sample: int = LABEL_SAMPLE) -> List[Finding]:
    """Checks of a split's labels (a dataset.label_files reader): cluster use against ``num_classes``, on
    ``sample`` utterances spread over the split (all of it up to that), and, with ``num_frames`` (the labels each
    utterance's audio needs), every utterance's label count, from the index. Findings are at update 0."""
    picks = spread(len(labels), sample)
    ids = np.concatenate([labels[int(i)] for i in picks]) if len(picks) else np.zeros(0, dtype=np.int64)
    outside = (ids < 0) | (ids >= num_classes)
    counts = np.bincount(ids[~outside], minlength=num_classes)
    found = []
    if outside.any():
        found.append(Finding("labels", 0, f"{source}: {int(outside.sum())} label(s) outside [0, --num-classes "
                                          f"{num_classes})"))
    unused = np.flatnonzero(counts == 0)
    if len(unused):
        found.append(Finding("labels", 0, f"{source}: {len(unused)} of {num_classes} clusters never occur "
                                          f"(first: {unused[:5].tolist()}); is --num-classes the k of k-means?"))
    if len(ids) and counts.max() > DOMINANT_SHARE * len(ids):
        found.append(Finding("labels", 0, f"{source}: cluster {int(counts.argmax())} holds "
                                          f"{counts.max() / len(ids):.0%} of the frames"))
    if num_frames is not None:
        have = np.asarray(labels.counts)
        bad = np.flatnonzero(have != num_frames)
        if len(bad):
            found.append(Finding("labels", 0, f"{source}: {len(bad)} utterance(s) have label counts that do not "
                                              f"match their audio (first: line {bad[0] + 1}, {have[bad[0]]} labels "
                                              f"for {num_frames[bad[0]]} frames)"))
    return found


def label_prior(dataset_path, feature_type: str, split: str = "valid", sample: int = LABEL_SAMPLE) -> float:
    """Accuracy of always guessing a split's commonest label, on the frames training scores (MFCC labels are
    100 Hz: every other one), over ``sample`` utterances spread over it: what masked accuracy must beat."""
    from dataset.label_files import open_labels

    from utils.label_quality import prior_of

    labels = open_labels(Path(dataset_path) / "label", split)
    return prior_of((labels[int(i)] for i in spread(len(labels), sample)), feature_type)


def dataset_label_findings(dataset_path, feature_type: str, num_classes: int, split: str = "train",
                           dataset: str = "librispeech") -> List[Finding]:
    """label_findings for a train.py --dataset-path (its TSV gives the label count each utterance needs)."""
    from dataset.hubert_dataset import KERNEL, LABEL_HOP
    from dataset.label_files import open_labels
    from dataset.manifest import Manifest

    dataset_path = Path(dataset_path)
    labels = open_labels(dataset_path / "label", split)
    lengths = Manifest(dataset_path / "tsv" / f"{dataset}_{split}.tsv").lengths
    needed = np.where(lengths >= KERNEL, (lengths - KERNEL) // LABEL_HOP[feature_type] + 1, 0)
    return label_findings(labels, num_classes, needed if len(needed) == len(labels) else None, str(labels.path))
