"""The software a script runs on, said in its first log line, and a warning for anything outside the versions
the test suite has passed on (requirements.txt's ranges; Python 3.10-3.13). A warning, not an error: a platform's
own torch build (Intel Gaudi's, a cluster's) may well work, and the user should know what was not tested."""
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
PYTHONS = ((3, 10), (3, 13))
NAMED = ("torch", "torchaudio", "pytorch-lightning")
# Intel Gaudi: the Lightning plugin, and the PyTorch bridge whose version is the Gaudi software's.
HABANA = ("lightning-habana", "habana-torch-plugin")


def requirement_ranges(path: Path = REQUIREMENTS) -> dict:
    """{package: SpecifierSet} of a requirements file (``name>=low,<=high`` lines; comments, ``-r`` lines
    skipped)."""
    from packaging.requirements import Requirement  # here: tools/keep_torch.py runs where only torch is

    ranges = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            ranges[req.name.lower()] = req.specifier
    return ranges


def installed(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def outside(versions: Dict[str, Optional[str]], ranges: dict) -> List[str]:
    """One sentence for each installed package whose version lies outside its tested range."""
    from packaging.version import InvalidVersion, Version

    found = []
    for name, version in versions.items():
        if version is None or name not in ranges:
            continue
        try:
            inside = ranges[name].contains(Version(version), prereleases=True)
        except InvalidVersion:
            inside = False
        if not inside:
            found.append(f"{name} {version} is outside the tested range {ranges[name]} (requirements.txt)")
    return found


def release(version: str) -> Tuple[int, ...]:
    """(2, 7, 1) of '2.7.1+hpu.synapse.v1.22.0' or '2.7.1a0+git': the release a build was made from."""
    return tuple(int(n) for n in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def torchaudio_for(torch_version: str) -> str:
    """The torchaudio requirement made for a torch: up to 2.10 each torchaudio release names its torch release
    exactly; torchaudio 2.11 runs on torch 2.11 and newer (and 2.11.0's metadata names no torch at all, so pip
    would pair it with any torch)."""
    torch = release(torch_version)
    return "torchaudio>=2.11" if torch >= (2, 11) else "torchaudio==" + ".".join(map(str, torch))


def mismatched_torchaudio(torch_version: Optional[str], torchaudio_version: Optional[str]) -> List[str]:
    """A sentence when the installed torchaudio was not made for the installed torch."""
    if torch_version is None or torchaudio_version is None:
        return []
    torch, torchaudio = release(torch_version), release(torchaudio_version)
    if torchaudio == torch or min(torch, torchaudio) >= (2, 11):
        return []
    return [f"torchaudio {torchaudio_version} is not made for torch {torch_version}: install "
            f"{torchaudio_for(torch_version)}"]


def stack_report(ranges: Optional[dict] = None) -> tuple:
    """(the line naming torch, torchaudio, Lightning, Habana's software where present and Python; the warnings)."""
    ranges = requirement_ranges() if ranges is None else ranges
    versions = {name: installed(name) for name in ranges}
    named = {name: versions.get(name) or installed(name) for name in NAMED}
    named.update({name: v for name in HABANA if (v := installed(name)) is not None})
    python = platform.python_version()
    line = ", ".join(f"{name} {v or 'not installed'}" for name, v in named.items()) + f", Python {python}"
    warnings = outside(versions, ranges) + mismatched_torchaudio(named["torch"], named["torchaudio"])
    if not PYTHONS[0] <= sys.version_info[:2] <= PYTHONS[1]:
        warnings.append(f"Python {python} is outside the supported range " + "-".join(
            ".".join(map(str, v)) for v in PYTHONS))
    if warnings:
        warnings.append("the tested stacks are listed in BENCHMARKS.md (\"Tested stacks\"); a run may still work")
    return line, warnings


def log_stack(script: str, info, warn) -> None:
    """Log the stack line with ``info`` and each finding with ``warn`` (rank-zero loggers under DDP)."""
    line, warnings = stack_report()
    info(f"{script}: {line}")
    for text in warnings:
        warn(f"{script}: {text}")
