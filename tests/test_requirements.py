"""The requirement files: ranges tested at both ends (bench/stacks/), a lock inside them that keeps an installed
torch, and code that Pythons 3.10-3.13 can run (checked with ruff and vermin, as only 3.11 runs here)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from utils.versions import requirement_ranges

REPO = Path(__file__).resolve().parents[1]
VERMIN = str(Path(sys.executable).parent / "vermin")  # it has no `python -m vermin`
RANGES = {**requirement_ranges(REPO / "requirements.txt"), **requirement_ranges(REPO / "requirements-dev.txt")}
# Standard-library modules removed in Python 3.12 (PEP 632, 594's first) and 3.13 (PEP 594).
REMOVED = {"distutils", "imp", "asynchat", "asyncore", "smtpd", "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt",
           "imghdr", "mailcap", "msilib", "nis", "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau",
           "telnetlib", "uu", "xdrlib", "lib2to3"}


def pins(path: Path) -> dict:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {name.lower(): Version(v) for name, v in (line.split("==") for line in lines if line)}


def python_files():
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_every_requirement_is_a_closed_range():
    for name, spec in RANGES.items():
        assert sorted(s.operator for s in spec) == ["<=", ">="], f"{name}{spec}: give the tested lowest and highest"


@pytest.mark.parametrize("end, operator", [("lowest", ">="), ("highest", "<=")])
def test_each_range_ends_at_a_tested_stack(end, operator):
    """The stacks that bench/stacks.py runs the suite on are the ranges' very ends: no claimed version untested."""
    stack = pins(REPO / "bench" / "stacks" / f"{end}.txt")
    for name, version in stack.items():
        if name not in RANGES:  # a dependency of a dependency, pinned at its age (the file says why)
            continue
        bound = next(Version(s.version) for s in RANGES[name] if s.operator == operator)
        assert version == bound, f"bench/stacks/{end}.txt has {name}=={version}, requirements say {operator}{bound}"
    assert set(requirement_ranges(REPO / "requirements.txt")) <= set(stack), "every core package has a tested end"


def test_the_lock_lies_inside_every_range():
    lock = pins(REPO / "requirements-lock.txt")
    for name, spec in RANGES.items():
        assert name in lock, f"requirements-lock.txt lacks {name}"
        assert spec.contains(lock[name]), f"requirements-lock.txt has {name}=={lock[name]}, outside {spec}"


def test_installing_the_requirements_keeps_the_installed_torch(tmp_path):
    """pip, asked for the requirements in this environment (torch from the lock, not the newest in the range),
    installs nothing of the core stack: an exact pin other than the installed torch would replace it."""
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--report", str(report),
                    "-r", str(REPO / "requirements-dev.txt")], check=True, capture_output=True)
    would_install = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert not would_install & {"torch", "torchaudio", "pytorch-lightning"}, would_install


def test_syntax_runs_on_python_3_10_to_3_13():
    """ruff parses for the oldest supported Python (newer syntax is an error) and flags invalid escapes, which
    Python 3.12 turned into SyntaxWarnings."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--target-version",
                           "py310", "--select", "E9,W605", *python_files()], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_standard_library_use_runs_on_python_3_10_to_3_13():
    """vermin: nothing of the standard library newer than 3.10; and no module that 3.12 or 3.13 removed."""
    proc = subprocess.run([VERMIN, "--no-tips", "--violations", "-t=3.10-",
                           *python_files()], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in python_files():
        for node in ast.walk(ast.parse((REPO / path).read_text(), path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not {n.split(".")[0] for n in names} & REMOVED, f"{path}:{node.lineno} imports {names}"


def test_the_checks_see_newer_syntax_and_library_use(tmp_path):
    """The two tools fail on what 3.10 cannot run (so the tests above can fail)."""
    newer = tmp_path / "newer.py"
    newer.write_text("import tomllib\ntry:\n    pass\nexcept* ValueError:\n    pass\n")
    for command in ([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--target-version", "py310",
                     "--select", "E9"], [VERMIN, "--no-tips", "--violations", "-t=3.10-"]):
        proc = subprocess.run([*command, str(newer)], capture_output=True, text=True)
        assert proc.returncode != 0, f"{command[:3]} accepted 3.11 code"


def test_stacks_reads_pytest_closing_lines_and_tables_them(monkeypatch):
    """bench/stacks.py's record: pytest's counts per run, one table row per stack (the run itself needs the
    index and a few GB, so it lives in bench/)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import stacks

    assert stacks.counts("x\n1 failed, 406 passed, 5 skipped, 2 errors in 1601.57s (0:26:41)\n") == {
        "failed": 1, "passed": 406, "skipped": 5, "error": 2}
    assert stacks.pins("lowest")["torch"] == "2.7.1"
    row = stacks.table([{"stack": "lowest", "commit": "abc1234", "python": "3.11.7", "keeps_torch": False,
                         "versions": dict.fromkeys(stacks.CORE, "1.0"),
                         "runs": [{"minutes": 12.5, "passed": 3, "failed": 0, "skipped": 2}, {"minutes": 1.5,
                                                                                              "passed": 1}]}])
    assert row.splitlines()[-1] == ("| lowest | abc1234 | 1.0 | 1.0 | 1.0 | 1.0 | 1.0 | 3.11.7 | NO | 3 passed, "
                                    "0 failed, 2 skipped | 1 passed, 0 failed | 12.5 + 1.5 |")
