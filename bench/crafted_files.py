"""Crafted files (docs/security.md): run every crafted-file test and print BENCHMARKS.md's table of them.

    python bench/crafted_files.py [--work /tmp/crafted]

Each case is a test that builds the crafted file for real (a tar, a pickle that would write a marker file if
loaded, a keeper state, an export folder, symbolic links, float audio, a FLAC corrupt in its middle, ...) and
asserts the file is refused with an error naming it, or handled, and that nothing was written outside the
folder the test gave the script (its markers and victims are checked by the test itself). This runs them in one
pytest session under --work, then counts what must not exist anywhere there (the tests' outside markers:
evil.txt, code_ran) and checks that the repository's own files did not change.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("evil.txt", "code_ran")

# (crafted file, where it comes in, what happens, the test)
CASES = [
    ("tar: a chain of symbolic links then a file through it; a link out; a hard link; a character device; a fifo; "
     "an absolute name; a `../` name", "dataset_itr1.py extraction", "refused, member named, nothing extracted",
     "tests/test_dataset_itr1.py::test_crafted_member_is_refused_by_name_and_nothing_is_written"),
    ("k-means `model.pt` pickle that writes a file when loaded; `.npy` holding a pickle; NaN centres",
     "preprocess.py (labels, re-run), tools/", "refused, never unpickled; a trusted old model converts in one command",
     "tests/test_kmeans.py::test_a_pickled_model_is_never_loaded_and_an_earlier_versions_converts_in_one_command"),
    ("checkpoint holding a pickle that writes a file when loaded", "every script that reads a checkpoint",
     "refused (weights_only=True), file named",
     "tests/test_checkpoint.py::test_a_checkpoint_holding_code_is_refused_and_the_code_never_runs"),
    ("checkpoint keeper state naming `../hparams.yaml`, an absolute path, other files", "train.py / finetune.py resume",
     "names ignored: only the keeper's own checkpoints pruned",
     "tests/test_callbacks.py::test_a_crafted_keeper_state_prunes_only_the_keepers_own_files"),
    ("`--hf-dir` holding a checkpoint, a subfolder, a link; `--hf-dir` a file", "export.py --overwrite",
     "refused, names listed, nothing deleted",
     "tests/test_export.py::test_overwrite_refuses_an_hf_dir_holding_anything_export_did_not_write"),
    ("symbolic link loop, alias folder, linked and hard-linked file", "preprocess.py listing",
     "each real file listed once, loop ends",
     "tests/test_common_utils.py::test_symlink_loops_end_and_aliases_list_each_real_file_once"),
    ("`--root-dir` under a folder named `train...`", "preprocess.py listing", "dev/test not listed",
     "tests/test_common_utils.py::test_only_the_path_below_the_root_counts_for_train"),
    ("float audio with NaN, +inf, -inf mid-file (under a .flac name)", "preprocess.py check, every audio reader",
     "refused, file and sample named",
     "tests/test_common_utils.py::test_float_audio_with_nan_or_inf_is_refused_by_name"),
    ("TSV sample count off by -3 / +2; unreadable file", "train.py start-up", "refused at start, file and line named",
     "tests/test_manifest.py::test_a_sample_count_off_by_a_few_is_named_at_start_up"),
    ("FLAC corrupt in its middle (header and tail fine)", "finetune.py loading", "refused, file named",
     "tests/test_asr_dataset.py::test_a_flac_corrupt_in_its_middle_is_named_when_loaded"),
    ("TSV root or path not UTF-8", "train.py start-up, preprocess.py --rank", "refused, file and line named",
     "tests/test_manifest.py::test_a_list_that_is_not_utf8_is_named_with_its_line"),
    ("object-dtype `.npy` labels (a pickle); not a .npy", "train.py start-up", "refused, never unpickled",
     "tests/test_label_files.py::test_pickled_npy_labels_are_never_loaded"),
    ("text label beyond int64, not a number", "train.py", "refused, file and line named",
     "tests/test_label_files.py::test_a_text_label_that_is_no_int64_is_named"),
    ("malformed `hparams.yaml`, one with a code-running yaml tag; non-numeric or step-less `metrics.csv`",
     "tools/report.py", "refused, file (and line) named; no Python object built",
     "tests/test_health.py::test_a_malformed_log_file_is_named_by_report"),
]


class Outcomes:
    """pytest plugin: the outcome of every test, by node id."""

    def __init__(self):
        self.by_id = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.by_id[report.nodeid] = report.outcome


def repo_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=REPO, capture_output=True,
                          text=True).stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="pytest's --basetemp (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="crafted_"))
    before, outcomes = repo_state(), Outcomes()
    pytest.main(["-q", "-p", "no:cacheprovider", "--basetemp", str(work), "--rootdir", str(REPO),
                 "-o", "tmp_path_retention_policy=all", "-o", "tmp_path_retention_count=1000",  # kept for the scan
                 "-c", str(REPO / "pytest.ini"), *(str(REPO / test) for *_, test in CASES)], plugins=[outcomes])
    print("| crafted file | comes in through | what happens | tests (cases) | passed |\n|---|---|---|---|---|")
    total = passed = 0
    for crafted, where, what, test in CASES:
        results = [o for node, o in outcomes.by_id.items() if node.split("[")[0] == test]
        total, passed = total + len(results), passed + results.count("passed")
        print(f"| {crafted} | {where} | {what} | `{test.split('::')[1]}` ({len(results)}) | "
              f"{results.count('passed')} / {len(results)} |")
    left = [p for name in MARKERS for p in work.rglob(name)]
    unchanged = repo_state() == before
    print(f"\n{passed} / {total} crafted-file tests passed; marker files ({', '.join(MARKERS)}) under {work}: "
          f"{len(left)}; repository files {'unchanged' if unchanged else 'CHANGED'}")
    return 0 if passed == total and not left and unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
