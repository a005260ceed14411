"""utils/versions.py: the stack named in each script's first log line; versions outside the tested ranges warned."""
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from utils.versions import mismatched_torchaudio, outside, requirement_ranges, stack_report, torchaudio_for

REPO = Path(__file__).resolve().parents[1]


def test_the_installed_stack_is_named_and_inside_the_requirement_ranges():
    line, warnings = stack_report()
    for name in ("torch", "torchaudio", "pytorch-lightning"):
        assert f"{name} {metadata.version(name)}" in line
    assert line.endswith(f"Python {platform.python_version()}")
    assert warnings == []


def test_a_version_outside_its_range_is_a_warning_that_names_the_range():
    ranges = {"torch": SpecifierSet(">=2.7.1,<=2.14.1"), "numpy": SpecifierSet(">=1.26.4,<=2.4.6")}
    found = outside({"torch": "2.6.0", "numpy": "2.4.6", "tqdm": "1.0"}, ranges)
    assert found == ["torch 2.6.0 is outside the tested range <=2.14.1,>=2.7.1 (requirements.txt)"]
    # A platform's own build (local version label, e.g. Intel Gaudi's torch) inside the range is fine.
    assert outside({"torch": "2.7.1+hpu.synapse.v1.22.0"}, ranges) == []
    assert outside({"torch": "2.15.0"}, ranges) and outside({"torch": "not-a-version"}, ranges)
    assert outside({"torch": None}, ranges) == []  # not installed: nothing to say


def test_report_warns_and_points_at_the_tested_stacks(monkeypatch):
    ranges = dict(requirement_ranges(), torch=SpecifierSet(">=99"))
    _, warnings = stack_report(ranges)
    assert warnings[0].startswith("torch ") and ">=99" in warnings[0]
    assert "Tested stacks" in warnings[-1]


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--dataset-path", "{tmp}", "--feature-type", "mfcc", "--num-classes", "100"]),
    ("finetune.py", ["--checkpoint", "{tmp}/none.ckpt", "--train-dir", "{tmp}", "--valid-dir", "{tmp}",
                     "--exp-dir", "{tmp}/ft"]),
    ("preprocess.py", ["--root-dir", "{tmp}/none", "--exp-dir", "{tmp}/exp"]),
])
def test_first_log_line_names_the_stack(tmp_path, script, args):
    """Each script says what it runs on before anything else (here it then stops on a missing input)."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    first = (proc.stdout + proc.stderr).splitlines()[0]
    assert first == f"{script}: {stack_report()[0]}"


def test_torchaudio_made_for_each_torch():
    assert torchaudio_for("2.7.1") == "torchaudio==2.7.1"
    assert torchaudio_for("2.7.1+hpu.synapse.v1.22.0") == "torchaudio==2.7.1"  # Intel Gaudi's build of 2.7.1
    assert torchaudio_for("2.14.1") == torchaudio_for("2.11.0") == "torchaudio>=2.11"
    assert mismatched_torchaudio("2.7.1", "2.7.1") == mismatched_torchaudio("2.14.1", "2.11.1") == []
    # What pip does unguided: torchaudio 2.11.0 names no torch, so it lands beside torch 2.7.1.
    assert mismatched_torchaudio("2.7.1+cu126", "2.11.0") == [
        "torchaudio 2.11.0 is not made for torch 2.7.1+cu126: install torchaudio==2.7.1"]
    assert mismatched_torchaudio("2.11.0", "2.10.0") and mismatched_torchaudio("2.8.0", "2.7.1")


def test_keep_torch_names_the_installed_torch_and_its_torchaudio():
    proc = subprocess.run([sys.executable, "tools/keep_torch.py"], cwd=REPO, capture_output=True, text=True,
                          check=True)
    assert proc.stdout.splitlines() == [f"torch=={metadata.version('torch')}",
                                        f"torchaudio=={metadata.version('torchaudio')}"]
