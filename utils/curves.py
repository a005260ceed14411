"""Training curves from Lightning's metrics.csv: read them, summarise them, plot them to a PNG."""
import csv
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

Series = Dict[str, List[Tuple[int, float]]]  # metric -> [(step, value)]
# One panel: (title, y label, [(metric, line style, legend suffix)]).
Panel = Tuple[str, str, Sequence[Tuple[str, str, str]]]
PRETRAINING_PANELS: Sequence[Panel] = (
    ("loss", "loss per masked frame", [("train_loss_step", "-", "train"), ("val_loss", "o--", "val")]),
    ("masked accuracy", "masked accuracy", [("train_masked_accuracy", "-", "train"),
                                            ("val_masked_accuracy", "o--", "val")]),
)
FINETUNING_PANELS: Sequence[Panel] = (
    ("CTC loss", "CTC loss per utterance", [("train_loss_step", "-", "train"), ("val_loss", "o--", "val")]),
    ("held-out CER", "character error rate (greedy)", [("val_cer", "o--", "val")]),
)


def metrics_csv(exp_dir) -> Path:
    """The metrics.csv of the newest Lightning log version under ``exp_dir``."""
    found = sorted(Path(exp_dir).glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no lightning_logs/version_*/metrics.csv under {exp_dir}")
    return found[-1]


def read_metrics(path) -> Series:
    """Every logged metric as (step, value) pairs, in file order; a file that is not Lightning's CSV of numbers is
    an error naming it, the line and the column."""
    series: Series = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: not a Lightning metrics.csv (no 'step' column in its header)")
        for row in reader:
            name = "step"
            try:
                step = int(row["step"])
                for name, value in row.items():
                    if name not in ("step", "epoch") and value not in ("", None):
                        series.setdefault(name, []).append((step, float(value)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{reader.line_num}: column {name!r} is not a number ({e})") from None
    return series


def last(series: Series, name: str, default=float("nan")) -> float:
    values = series.get(name)
    return values[-1][1] if values else default


def plot_curves(runs: Dict[str, Series], png, title: str = "HuBERT pre-training",
                panels: Sequence[Panel] = PRETRAINING_PANELS) -> Path:
    """One plot per panel (by default loss and masked accuracy, train per step and validation), one colour
    per run, steps on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for i, (label, series) in enumerate(runs.items()):
        for ax, (_, _, lines) in zip(axes, panels):
            for name, style, suffix in lines:
                points = series.get(name, [])
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, color=f"C{i}", alpha=0.6 if style == "-" else 1.0,
                            markersize=3, label=f"{label} {suffix}")
    for ax, (panel_title, ylabel, _) in zip(axes, panels):
        ax.set(xlabel="update", ylabel=ylabel, title=panel_title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel none of the runs logged stays without a legend
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
