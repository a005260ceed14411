"""Training curves from Lightning's metrics.csv: read them, summarise them, plot them to a PNG."""
import csv
from pathlib import Path
from typing import Dict, List, Tuple

Series = Dict[str, List[Tuple[int, float]]]  # metric -> [(step, value)]


def metrics_csv(exp_dir) -> Path:
    """The metrics.csv of the newest Lightning log version under ``exp_dir``."""
    found = sorted(Path(exp_dir).glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no lightning_logs/version_*/metrics.csv under {exp_dir}")
    return found[-1]


def read_metrics(path) -> Series:
    """Every logged metric as (step, value) pairs, in file order."""
    series: Series = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(name, []).append((step, float(value)))
    return series


def last(series: Series, name: str, default=float("nan")) -> float:
    values = series.get(name)
    return values[-1][1] if values else default


def plot_curves(runs: Dict[str, Series], png, title: str = "HuBERT pre-training") -> Path:
    """Loss (train per step, validation) and masked accuracy (train epoch-to-date, validation) of each run,
    one colour per run, steps on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, series) in enumerate(runs.items()):
        color = f"C{i}"
        for ax, name, style, suffix in ((ax_loss, "train_loss_step", "-", "train"),
                                        (ax_loss, "val_loss", "o--", "val"),
                                        (ax_acc, "train_masked_accuracy", "-", "train"),
                                        (ax_acc, "val_masked_accuracy", "o--", "val")):
            points = series.get(name, [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, color=color, alpha=0.6 if style == "-" else 1.0,
                        markersize=3, label=f"{label} {suffix}")
    ax_loss.set(xlabel="update", ylabel="loss per masked frame", title="loss")
    ax_acc.set(xlabel="update", ylabel="masked accuracy", title="masked accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png
