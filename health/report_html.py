"""report.html: one self-contained page (inline SVG, no script, no network) with a run's findings and curves,
several runs overlaid (a flag sweep), and trusted runs drawn as the band their seeds span."""
import html
import math
from typing import Dict, List, Sequence, Tuple

from health.checks import Finding
from health.history import RunHistory

Points = List[Tuple[int, float]]
PANELS: Sequence[Tuple[str, Sequence[str]]] = (
    ("training loss", ("train_loss_step",)),
    ("validation loss", ("val_loss",)),
    ("masked accuracy", ("train_masked_accuracy", "val_masked_accuracy")),
    ("unmasked accuracy", ("train_unmasked_accuracy", "val_unmasked_accuracy")),
    ("masked accuracy / label prior", ("train_masked_accuracy / label prior", "val_masked_accuracy / label prior")),
    ("validation CER / WER", ("val_cer", "val_wer")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("skipped updates", ("skipped_steps",)),
    ("throughput (audio s/s, rank 0)", ("audio_seconds_per_second",)),
    ("padding share of the batches (rank 0)", ("padding_share",)),
    ("loader wait per update (s)", ("data_wait",)),
)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H, PAD = 420, 220, 40


def band(trusted: Sequence[RunHistory], metric: str) -> Tuple[Points, Points]:
    """(lowest, highest) value of ``metric`` over the trusted runs at each step all of them logged."""
    per_run = [dict(t.points(metric)) for t in trusted]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    return ([(s, min(p[s] for p in per_run)) for s in steps], [(s, max(p[s] for p in per_run)) for s in steps])


def svg(title: str, lines: Dict[str, Points], bands: List[Tuple[Points, Points]]) -> str:
    finite = [(s, v) for pts in [*lines.values(), *(b for lo_hi in bands for b in lo_hi)] for s, v in pts
              if math.isfinite(v)]
    if not finite:
        return ""
    x0, x1 = min(s for s, _ in finite), max(s for s, _ in finite)
    y0, y1 = min(v for _, v in finite), max(v for _, v in finite)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-12)

    def xy(s, v):
        return (f"{PAD + (s - x0) / (x1 - x0) * (W - PAD - 10):.1f},"
                f"{H - PAD + 10 - (v - y0) / (y1 - y0) * (H - PAD - 10):.1f}")

    parts = [f'<svg class="chart" width="{W}" height="{H + 20}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{PAD}" y="12" font-size="12" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{H - PAD + 10}" x2="{W - 10}" y2="{H - PAD + 10}" stroke="#888"/>',
             f'<line x1="{PAD}" y1="20" x2="{PAD}" y2="{H - PAD + 10}" stroke="#888"/>',
             f'<text x="{PAD}" y="{H - PAD + 24}" font-size="10">{x0}</text>',
             f'<text x="{W - 10}" y="{H - PAD + 24}" font-size="10" text-anchor="end">update {x1}</text>',
             f'<text x="{PAD - 3}" y="{H - PAD + 10}" font-size="10" text-anchor="end">{y0:.3g}</text>',
             f'<text x="{PAD - 3}" y="24" font-size="10" text-anchor="end">{y1:.3g}</text>']
    for lo, hi in bands:
        if lo:
            points = " ".join(xy(s, v) for s, v in lo + hi[::-1])
            parts.append(f'<polygon class="band" points="{points}" fill="#bbb" fill-opacity="0.5"/>')
    for i, (label, pts) in enumerate(lines.items()):
        pts = [(s, v) for s, v in pts if math.isfinite(v)]
        colour = COLOURS[i % len(COLOURS)]
        if pts:
            coords = " ".join(xy(s, v) for s, v in pts)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.3" points="{coords}">'
                         f'<title>{html.escape(label)}</title></polyline>')
        parts.append(f'<text x="{W - 10}" y="{30 + 12 * i}" font-size="10" text-anchor="end" fill="{colour}">'
                     f'{html.escape(label)}</text>')
    return "\n".join(parts + ["</svg>"])


def render(runs: Sequence[Tuple[str, RunHistory, List[Finding]]], trusted: Sequence[RunHistory] = ()) -> str:
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{f.step}</td><td>{html.escape(f.check)}</td>"
                   f"<td>{html.escape(f.message)}</td></tr>" for name, _, found in runs for f in found)
    rows = rows or '<tr><td colspan="4">no findings</td></tr>'
    charts = []
    for title, metrics in PANELS:
        lines = {f"{name} {m}" if len(runs) > 1 or len(metrics) > 1 else name: h.points(m)
                 for name, h, _ in runs for m in metrics if h.points(m)}
        bands = [band(trusted, m) for m in metrics] if trusted else []
        chart = svg(title, lines, bands) if lines else ""
        if chart:
            charts.append(chart)
    names = ", ".join(html.escape(name) for name, _, _ in runs)
    against = f"; grey: the band of {len(trusted)} trusted run(s)" if trusted else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>HuBERT run report</title><style>"
            "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 6px;font-size:13px}.chart{margin:4px}</style></head><body>"
            f"<h1>Run report: {names}</h1><p>Findings (tools/report.py; thresholds in health/checks.py){against}</p>"
            "<table id=\"findings\"><tr><th>run</th><th>update</th><th>check</th><th>finding</th></tr>"
            f"{rows}</table><h2>Curves</h2><div id=\"charts\">{''.join(charts)}</div></body></html>\n")
