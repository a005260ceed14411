"""Trusted runs: a recipe's runs over several seeds (bench/trusted_runs.py makes them), kept small in
``health/trusted/<recipe>/seed_<S>/<run>/`` as one Lightning log version each, with ``figures.json`` per seed.
tools/report.py draws the band they span behind a run made with the same flags; the demo says whether its
figures lie in the seeds' prediction interval."""
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from health.history import RunHistory, read_run

TRUSTED = Path(__file__).resolve().parent / "trusted"
# The flags that make two runs the same recipe (paths and seeds left out); fine-tuning also by whether it
# starts from a checkpoint.
RECIPE_KEYS = ("model_name", "feature_type", "num_classes", "max_updates", "warmup_updates", "learning_rate",
               "seconds_per_batch", "hold_updates", "decay_updates", "freeze_encoder_updates", "model_overrides")
# Metrics a trusted copy keeps (what the report page draws), to 5 significant digits.
KEPT = ("train_loss_step", "val_loss", "train_masked_accuracy", "val_masked_accuracy", "train_unmasked_accuracy",
        "val_unmasked_accuracy", "val_cer", "val_wer", "lr", "grad_norm", "skipped_steps",
        "audio_seconds_per_second", "padding_share", "data_wait")
# A new seed's figure lies in mean +- T_995[n - 1] * sd * sqrt(1 + 1/n) with 99% probability (normal figures);
# Student's t quantiles for n - 1 = 1..9 degrees of freedom.
T_995 = (63.657, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250)


def same_recipe(a: dict, b: dict) -> bool:
    return (all(a.get(k) == b.get(k) for k in RECIPE_KEYS)
            and ("decay_updates" in a) == ("decay_updates" in b)
            and (a.get("checkpoint") is None) == (b.get("checkpoint") is None))


def trusted_for(h: RunHistory, root: Optional[Path] = None) -> List[RunHistory]:
    """The trusted runs (every seed) made with ``h``'s recipe, or none."""
    runs = [read_run(d.parent) for d in sorted((root or TRUSTED).glob("*/seed_*/*/lightning_logs"))]
    return [t for t in runs if same_recipe(t.hparams, h.hparams)]


def save_trusted(h: RunHistory, dest: Path, label_prior: float = float("nan")) -> None:
    """A run's stitched history as a small trusted copy: the kept metrics, its recipe flags (and the label prior
    its ratios need: the copy has no labels)."""
    version = Path(dest) / "lightning_logs" / "version_0"
    version.mkdir(parents=True, exist_ok=True)
    names = [m for m in KEPT if h.points(m)]
    rows: Dict[int, Dict[str, float]] = {}
    for m in names:
        for step, value in h.points(m):
            rows.setdefault(step, {})[m] = value
    lines = [",".join(["step", *names])]
    lines += [",".join([str(step), *(f"{row[m]:.5g}" if m in row else "" for m in names)])
              for step, row in sorted(rows.items())]
    (version / "metrics.csv").write_text("\n".join(lines) + "\n")
    keep = {k: h.hparams.get(k) for k in RECIPE_KEYS if k in h.hparams}
    keep.update(seed=h.hparams.get("seed"), checkpoint="(a checkpoint)" if h.hparams.get("checkpoint") else None)
    if math.isfinite(label_prior):
        keep["label_prior"] = round(label_prior, 6)
    (version / "hparams.yaml").write_text(yaml.safe_dump(keep, sort_keys=True))


def machine() -> dict:
    """What a figure depends on besides the seed: the CPU and whether the tiny recipe trains in bf16 there."""
    import torch

    from utils.device import fast_cpu_bf16

    return {"cpu": platform.processor() or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16": fast_cpu_bf16(), "torch": torch.__version__}


def seeds_figures(recipe: str, root: Optional[Path] = None) -> List[dict]:
    """Every trusted seed's figures.json of ``recipe``."""
    return [json.loads(p.read_text()) for p in sorted(((root or TRUSTED) / recipe).glob("seed_*/figures.json"))]


def interval(values: List[float]) -> Tuple[float, float]:
    """The 99% prediction interval of one more seed's figure (n >= 2 seeds)."""
    n = len(values)
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = T_995[min(n, len(T_995)) - 2] * sd * math.sqrt(1 + 1 / n)
    return mean - half, mean + half


def band_verdict(figures: dict, seeds: List[dict], keys: List[Tuple[str, str]]) -> List[str]:
    """One line per (run, figure) of ``keys``: the value, the seeds' range and interval, and whether it lies in
    the interval; the last line is the verdict."""
    lines, outside = [], []
    for run, name in keys:
        values = [s["figures"][run][name] for s in seeds]
        lo, hi = interval(values)
        value = figures[run][name]
        ok = lo <= value <= hi
        outside += [] if ok else [f"{run} {name}"]
        lines.append(f"  {run + ' ' + name:<36} {value:>7.3f}  seeds {min(values):.3f}-{max(values):.3f}  "
                     f"99% interval {lo:.3f}-{hi:.3f}  {'inside' if ok else 'OUTSIDE'}")
    made_on = seeds[0]["machine"]
    here = machine()
    same = all(made_on.get(k) == here[k] for k in ("capability", "bf16"))
    lines.append(f"this run lies {'inside' if not outside else 'OUTSIDE'} the band of {len(seeds)} trusted seeds"
                 + ("" if not outside else f" ({', '.join(outside)})")
                 + ("" if same else f"; they were made on a CPU with {made_on['capability']} (bf16 {made_on['bf16']}), "
                    f"this one has {here['capability']} (bf16 {here['bf16']}): figures differ across CPUs"))
    return lines
