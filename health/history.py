"""A run's history as one series per metric, stitched from every Lightning log version of its folder (a run
resumed several times logs into version_0, version_1, ...: a later version replaces what an earlier one logged
from its first step on, as the resumed run trained those updates again), with the run's flags."""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import yaml

from utils.curves import Series, read_metrics


@dataclass
class RunHistory:
    run_dir: Path
    hparams: dict
    series: Series
    versions: List[Path] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """'finetune' (CTC: a CER is logged) or 'pretrain'."""
        return "finetune" if "decay_updates" in self.hparams else "pretrain"

    def points(self, name: str) -> List[Tuple[int, float]]:
        return self.series.get(name, [])

    @property
    def last_step(self) -> int:
        return max((points[-1][0] for points in self.series.values() if points), default=-1)


class HparamsLoader(yaml.SafeLoader):
    """yaml's safe loader (plain data only: a file from elsewhere constructs no Python object) plus the tuples
    Lightning writes into hparams.yaml (``!!python/tuple``, for --betas and the loss weights)."""


HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                              lambda loader, node: tuple(loader.construct_sequence(node)))


def read_hparams(path: Path) -> dict:
    """A run's flags from its hparams.yaml ({} without one); a malformed file is an error naming it."""
    if not path.is_file():
        return {}
    try:
        hparams = yaml.load(path.read_text(), Loader=HparamsLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a Lightning hparams.yaml: {e}") from None
    if not isinstance(hparams, (dict, type(None))):
        raise ValueError(f"{path}: not a Lightning hparams.yaml: expected a mapping of flags, got "
                         f"{type(hparams).__name__}")
    return hparams or {}


def versions(run_dir) -> List[Path]:
    """``lightning_logs/version_N`` folders with a metrics.csv, in N order."""
    found = Path(run_dir).glob("lightning_logs/version_*/metrics.csv")
    return sorted((p.parent for p in found), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def read_run(run_dir) -> RunHistory:
    """The stitched history of ``run_dir`` (train.py's or finetune.py's --exp-dir); flags from the newest version."""
    found = versions(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no lightning_logs/version_*/metrics.csv (is it a train.py or "
                                "finetune.py --exp-dir?)")
    stitched: Series = {}
    for version in found:
        series = read_metrics(version / "metrics.csv")
        starts = [points[0][0] for points in series.values() if points]
        if not starts:
            continue
        first = min(starts)
        stitched = {name: [(s, v) for s, v in points if s < first] for name, points in stitched.items()}
        for name, points in series.items():
            stitched.setdefault(name, []).extend(points)
    hparams = read_hparams(found[-1] / "hparams.yaml")
    return RunHistory(Path(run_dir), hparams, {k: sorted(v) for k, v in stitched.items() if v}, found)
