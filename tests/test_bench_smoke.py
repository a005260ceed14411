"""The bench scripts run end to end at tiny sizes and print their tables (seconds each; the GPU suite's CPU
smoke run about 40 CPU-seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import (audio_check, data_path, flops, phone_finetune, preprocess_scale, real_speech, recompiles,
                   tiny_speed, tiny_study, train_step)
from utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_flops_reproduce_the_field_notes():
    """HuBERT Base at T=500 with 500 classes: 14.9 GFLOP forward, 44.6 training per audio second; CNN 33 %."""
    config = flops.arch_config("base", num_classes=500)
    n = flops.samples_for_frames(500)
    assert flops.conv_lengths(n, config["extractor_conv_layer_config"] or flops.HUBERT_CONV)[-1] == 500
    assert flops.flops_per_audio_second(config, n) / 1e9 == pytest.approx(44.6, abs=0.1)
    assert flops.flops_per_audio_second(config, n, training=False) / 1e9 == pytest.approx(14.9, abs=0.05)
    macs = flops.forward_macs(config, n)
    assert macs["cnn"] / sum(macs.values()) == pytest.approx(0.330, abs=0.002)


def test_train_step_prints_every_variant(capsys):
    results = train_step.main(["--quick", "--threads", "1", "--compile-backend", "eager", "--peak-tflops", "1"])
    assert list(results) == ["torchaudio", "ours default", "ours habana flags", "ours habana + compile"]
    assert results["torchaudio"]["ratio"] == 1.0
    assert all(r["audio_per_s"] > 0 and 0 < r["mfu"] < 1 for r in results.values())
    assert "MFU" in capsys.readouterr().out


def test_recompiles_counts_new_shapes(capsys):
    rows = recompiles.main(["--quick", "--max-steps", "2", "--cases", "static-none", "--dynamic", "False"])
    (label, steps, shapes, lens, graphs, recomp, *_), = rows
    assert label == "static-none dynamic=False" and steps == 2
    assert shapes == lens == 2 and graphs > 0 and recomp > 0  # crop to shortest: every batch a new shape
    assert "recompiles by function" in capsys.readouterr().out


def test_data_path_sections(capsys):
    results = data_path.main(["--quick", "--workers", "0"])
    assert {row[2] for row in results["padding"]} == {"none", "bucket1", "bucket2"}
    for _, _, align, stats in results["padding"]:
        assert (stats.padding_fraction > 0) == (align != "none")
        assert (stats.cropped_fraction > 0) == (align == "none")
    assert [(a, w) for a, w, _ in results["loader"]] == [("none", 0), ("bucket1", 0)]
    assert all(r["batches"] > 0 and r["audio"] > 0 for _, _, r in results["loader"])
    assert results["preprocess"]["audio"] > 0 and len(results["preprocess"]["predict"]) == 2
    assert "k-means predict" in capsys.readouterr().out


def test_tiny_study_prints_both_figures(tmp_path, capsys):
    result = tiny_study.main(["--corpus", str(REPO / "demo_data"), "--out", str(tmp_path / "run"),
                              "--num-cluster", "20", "--", "--max-updates", "3", "--warmup-updates", "1",
                              "--val-check-interval", "3"])
    out = capsys.readouterr().out
    assert "val masked accuracy / label-prior accuracy" in out and "held-out PNMI, best layer" in out
    assert result["updates"] == 3 and len(result["layers"]) == 6
    assert 0 < result["prior_accuracy"] < 1 and 0 < result["mfcc_pnmi"] < 1
    assert all(0 < r["pnmi"] < 1 for r in result["layers"])
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "curves.png").is_file()


def test_real_speech_runs_both_iterations(tmp_path, capsys):
    """On the demo corpus (the real-speech data stays outside the repo): held-out speakers validate, their
    alignments score the labels."""
    corpus = REPO / "demo_data"
    argv = ["--train-dir", str(corpus / "LibriSpeech" / "train-clean-100"),
            "--valid-dir", str(corpus / "LibriSpeech" / "dev-clean"),
            "--phone-audio", str(corpus / "LibriSpeech" / "dev-clean"),
            "--phone-alignments", str(corpus / "alignments" / "dev-clean.tsv"), "--out", str(tmp_path / "run"),
            "--num-cluster", "12", "--val-check-interval", "2", "--", "--max-updates", "2", "--warmup-updates", "1"]
    result = real_speech.main(argv)
    assert "PNMI per layer" in capsys.readouterr().out
    valid = (tmp_path / "mfcc_12" / "data" / "mfcc" / "tsv" / "librispeech_valid.tsv").read_text().splitlines()
    assert valid[0].endswith("dev-clean")
    assert len(valid) - 1 == len(list((corpus / "LibriSpeech" / "dev-clean").rglob("*.flac")))
    for name in ("iter1", "iter2"):
        r = result[name]
        assert len(r["layers"]) == 6 and all(0 < layer["pnmi"] < 1 for layer in r["layers"])
        assert 0 < r["prior_accuracy"] < 1 and r["ratio"] == r["val_masked_accuracy"] / r["prior_accuracy"]
    assert (tmp_path / "run" / "data" / f"hubert_{result['iter1']['best_layer']['layer']}" / "label").is_dir()
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "curves.png").is_file()
    # a re-run scores the trained model and trains nothing; --input scores the transformer's input as layer 0
    again = real_speech.main(["--iterations", "1", "--input", *argv])
    assert len(list((tmp_path / "run" / "iter1" / "lightning_logs").glob("version_*"))) == 1
    assert again["iter1"]["layers"][0]["layer"] == 0 and again["iter1"]["layers"][1:] == result["iter1"]["layers"]
    # --num-classes: the training labels' k, while the layers are still scored with --num-cluster's
    argv8 = [a if a != str(tmp_path / "run") else str(tmp_path / "run8") for a in argv]
    eight = real_speech.main(["--iterations", "1", "--num-classes", "8", *argv8])
    config = load_checkpoint(tmp_path / "run8" / "iter1" / real_speech.CHECKPOINT)["hubert_config"]
    assert config["num_classes"] == 8 and (tmp_path / "mfcc_8" / "data" / "mfcc" / "label").is_dir()
    assert len(eight["iter1"]["layers"]) == 6


def test_phone_finetune_scores_every_fold_and_resumes(tmp_path, capsys):
    """Demo speech with its espeak-ng phones renamed p0, p1, ... (TIMIT-like: lower case, no two alike when
    upper-cased); random weights and a pre-trained checkpoint, two folds of held-out speakers."""
    from model import hubert_pretrain_tiny

    names = {}
    lines = []
    for line in (REPO / "demo_data" / "alignments" / "dev-clean.tsv").read_text().splitlines():
        utt, phones = line.split("\t")
        lines.append(utt + "\t" + " ".join(p if p == "sil" else names.setdefault(p, f"p{len(names)}")
                                            for p in phones.split()))
    (tmp_path / "align.tsv").write_text("\n".join(lines) + "\n")
    model = hubert_pretrain_tiny()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hubert_config": model.config, "global_step": 10}, tmp_path / "pre.ckpt")
    argv = ["--audio", str(REPO / "demo_data" / "LibriSpeech" / "dev-clean"), "--alignments",
            str(tmp_path / "align.tsv"), "--checkpoint", f"pre={tmp_path / 'pre.ckpt'}", "--out", str(tmp_path / "run"),
            "--folds", "2", "--updates", "2", "--", "--warmup-updates", "1", "--freeze-encoder-updates", "1",
            "--val-check-interval", "2", "--log-every-n-steps", "1"]
    table = phone_finetune.main(argv)
    assert set(table) == {"random", "pre"} and all(0 <= per for per in table.values())
    assert "PER" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())["runs"]
    assert len(results) == 4 and results["pre/fold0"]["held_out"] == ["900", "902"]
    trans = (tmp_path / "run" / "fold0" / "corpus" / "LibriSpeech" / "dev-clean" / "900" / "900.trans.txt")
    first = trans.read_text().splitlines()[0].split()
    assert first[0] == "900-9001-0000" and "SIL" not in first and all(p.startswith("p") for p in first[1:])
    vocab = (tmp_path / "run" / "phones.txt").read_text().split()
    assert sorted(vocab) == sorted(names.values())
    ckpts = tmp_path / "run" / "fold0" / "pre" / "checkpoints_hubert_pretrain_tiny"
    kept = [p.name for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt"]
    assert kept == [(ckpts / "last.ckpt").resolve().name]  # the final state only
    assert phone_finetune.main(argv) == table  # a re-run fine-tunes nothing
    assert len(list((tmp_path / "run" / "fold1" / "pre" / "lightning_logs").glob("version_*"))) == 1


def test_gpu_suite_cpu_smoke_prints_every_row(tmp_path):
    """bench/gpu_suite.sh --cpu-smoke: the GPU suite's every section, reduced, on CPU, through the shell script."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--cpu-smoke", "--workdir", str(tmp_path),
                           "--out", str(tmp_path / "table.md")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    for needle in ["| ceiling | bf16 matmul", "| step | torchaudio (", "| step | torchaudio + compile",
                   "| step | ours habana + compile", "| train | train.py, 3 updates", "| train | waiting for batches",
                   "| preprocess | HuBERT layer 2", "| preprocess | whole preprocess.py", "| kmeans | sklearn",
                   "| kmeans | faiss GPU"]:
        assert needle in table, needle


def test_tiny_speed_times_every_variant(capsys):
    medians = tiny_speed.main(["--seconds", "1", "--rounds", "1", "--warmup", "0", "--threads", "1"])
    assert list(medians) == list(tiny_speed.VARIANTS) and all(t > 0 for t in medians.values())
    assert "time vs before" in capsys.readouterr().out


def test_preprocess_scale_measures_every_stage(tmp_path, capsys):
    """One tiny size (one process per stage, plus a whole run as the baseline); the line fits on given rows."""
    out = preprocess_scale.main(["--hours", "0.05", "--iterations", "2", "--num-cluster", "4", "--percent", "0.5",
                                 "--valid-percent", "0.3", "--work", str(tmp_path), "--baseline", str(REPO)])
    result, = out["results"][2]
    assert 0.04 < result["hours"] < 0.07
    assert set(result["rows"]) == set(preprocess_scale.STAGES)
    assert all(row["rss"] > 100 and row["cpu"] > 0 for row in result["rows"].values())
    assert 0 < result["rows"]["fit"]["sample"] <= result["rows"]["features"]["disk"]
    assert result["rows"]["labels"]["disk"] > 0 and result["rows"]["tsv"]["disk"] > 0
    assert out["baselines"][2][0]["rss"] > 100 and out["baselines"][2][0]["disk"] > result["rows"]["features"]["disk"]
    assert "iteration 2: peak RSS MB" in capsys.readouterr().out
    rows = [dict(hours=h, rows={stage: dict(rss=1000 + 10 * h, disk=2 * h, cpu=3 * h, sample=2 * h)
                                for stage in preprocess_scale.STAGES}) for h in (1, 2, 4)]
    fitted = preprocess_scale.extrapolate(rows, 960)
    assert fitted["fit"]["rss"]["at"] == pytest.approx(10600) and fitted["run"]["disk"]["per_hour"] == pytest.approx(8)


def test_audio_check_costs_every_check(capsys):
    rows = audio_check.main(["--files", "4", "--rounds", "1"])
    assert list(rows) == ["header", "tail", "full"]
    assert 0 < rows["header"]["ms_per_file"] and rows["header"]["s_per_hour"] < rows["full"]["s_per_hour"]
    assert "CPU min at 960 h" in capsys.readouterr().out


def test_fault_campaign_kills_and_reruns_preprocess(tmp_path, capsys):
    from bench import fault_campaign

    results = fault_campaign.main(["--out", str(tmp_path / "faults"), "--kills", "2", "--scripts", "preprocess_mfcc",
                                   "--checks", "kill"])
    trials = results["preprocess_mfcc"]
    assert len(trials) == 2 and all(t["rerun_ok"] and t["identical"] and not t["leftovers"] for t in trials), trials
    assert "| preprocess_mfcc |" in capsys.readouterr().out


def test_data_scale_measures_both_label_formats(tmp_path):
    """Tiny corpora (0.5 h and 1 h); each row a fresh process; the text index is built, then read."""
    result = subprocess.run([sys.executable, "bench/data_scale.py", "--hours", "0.5", "1", "--work", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [row[:4] for row in rows] == [[h, n, fmt, run] for h, n in (("0.5", "146"), ("1", "293"))
                                         for fmt, run in (("text", "first"), ("text", "again"), ("npy", "first"))]
    assert all(float(row[4]) < 30 and float(row[5]) < 1000 for row in rows)  # seconds, MB: a tiny corpus
