"""Run health: each finding made to happen on a real tiny train.py run (the live callback and tools/report.py),
and a healthy run reporting nothing."""
import csv
import logging
import time

import pytest
import pytorch_lightning as pl

import train
from health.checks import Finding, label_findings
from health.history import read_run
from health.report_html import render
from tests.fixtures import make_prepared_dataset
from tests.test_train import args_for, last_ckpt
from utils.checkpoint import load_checkpoint
from tools import report

RUN = ["--max-updates", "12", "--warmup-updates", "3", "--val-check-interval", "3", "--seconds-per-batch", "16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def healthy(data, tmp_path_factory):
    exp = tmp_path_factory.mktemp("healthy")
    train.main(args_for(data, exp, *RUN))
    return exp


def checks(found):
    return sorted({f.check for f in found})


def logged_health(exp):
    with open(next(exp.glob("lightning_logs/version_*/metrics.csv"))) as f:
        return {k: v for row in csv.DictReader(f) for k, v in row.items() if k.startswith("health_") and v}


def test_a_healthy_run_reports_nothing_and_writes_the_page(healthy, capsys):
    assert report.main([str(healthy)]) == 0
    out = capsys.readouterr().out
    assert f"{healthy}: no finding(s) in 12 updates (1 log version(s))" in out
    page = (healthy / "report.html").read_text()
    assert "no findings" in page and page.count("<svg") >= 7 and "masked accuracy / label prior" in page
    assert "http" not in page.replace(
        "http://www.w3.org/2000/svg", "")  # nothing to fetch: opens offline
    assert not logged_health(healthy)
    h = read_run(healthy)
    shares, rates = h.points("padding_share"), h.points("audio_seconds_per_second")
    assert [s for s, _ in shares] == [s for s, _ in rates] == [s for s, _ in h.points("train_loss_step")]
    assert all(0 <= v < 1 for _, v in shares) and all(v > 0 for _, v in rates)


def test_trusted_runs_are_the_default_reference(healthy, tmp_path, monkeypatch, capsys):
    """Trusted copies of a run (small: kept metrics, recipe flags, label prior) are found by recipe: the report
    draws their band without --against; a copy with other flags is not used."""
    from health import trusted

    h = read_run(healthy)
    for seed in (1, 2):
        trusted.save_trusted(h, tmp_path / "demo" / f"seed_{seed}" / "iter1", label_prior=0.25)
    h.hparams["max_updates"] = 13
    trusted.save_trusted(h, tmp_path / "other" / "seed_1" / "iter1")
    monkeypatch.setattr(trusted, "TRUSTED", tmp_path)
    copies = trusted.trusted_for(read_run(healthy))
    assert len(copies) == 2 and copies[0].hparams["label_prior"] == 0.25
    for name, points in read_run(healthy).series.items():
        if name in trusted.KEPT:
            assert [s for s, _ in copies[0].points(name)] == [s for s, _ in points]
            assert [v for _, v in copies[0].points(name)] == pytest.approx([v for _, v in points], rel=1e-4)
    assert report.main([str(healthy), "--no-labels"]) == 0
    assert "against 2 trusted run(s)" in capsys.readouterr().out
    page = (healthy / "report.html").read_text()
    assert 'class="band"' in page and "band of 2 trusted run(s)" in page


def test_the_kept_trusted_runs_pass_every_check():
    """health/trusted/: >= 5 seeds of each recipe, each run found as its recipe's reference (with every seed)
    and reporting nothing: the thresholds sit above what healthy seeds reach."""
    from health.checks import history_findings
    from health.trusted import TRUSTED, same_recipe, seeds_figures

    every = [read_run(folder.parent) for folder in sorted(TRUSTED.glob("*/seed_*/*/lightning_logs"))]
    for recipe, runs in (("demo", 4), ("tiny", 1)):
        seeds = seeds_figures(recipe)
        assert len(seeds) >= 5 and len({s["seed"] for s in seeds}) == len(seeds)
        kept = [h for h in every if h.run_dir.parent.parent.name == recipe]
        assert len(kept) == runs * len(seeds)
        for h in kept:
            assert sum(same_recipe(h.hparams, t.hparams) for t in every) == len(seeds), h.run_dir
            assert history_findings(h) == [], h.run_dir


def test_band_verdict_of_the_demo_figures():
    """A new seed's figure is judged against the seeds' 99% prediction interval, and a CPU other than the
    trusted runs' is named."""
    from health.trusted import band_verdict, interval, machine

    assert interval([1, 2, 3, 4, 5]) == pytest.approx((3 - 7.9745, 3 + 7.9745), abs=1e-3)
    seeds = [{"machine": machine(), "figures": {"iteration 1": {"ratio": r}}} for r in (2.0, 2.2, 2.4, 2.1, 2.3)]
    inside = band_verdict({"iteration 1": {"ratio": 2.6}}, seeds, [("iteration 1", "ratio")])
    assert inside[-1] == "this run lies inside the band of 5 trusted seeds"
    seeds[0]["machine"] = {**machine(), "capability": "AVX2", "bf16": False}
    outside = band_verdict({"iteration 1": {"ratio": 1.0}}, seeds, [("iteration 1", "ratio")])
    assert "OUTSIDE the band of 5 trusted seeds (iteration 1 ratio)" in outside[-1]
    assert "made on a CPU with AVX2 (bf16 False)" in outside[-1] and "figures differ across CPUs" in outside[-1]


def test_an_extended_run_is_stitched_and_its_changed_schedule_found(healthy, data, tmp_path, capsys):
    """Resumed from the finished run's last.ckpt with a later --max-updates: one history over two log versions;
    the flags' schedule now decays to the new end, so the LR logged before the resume no longer follows it."""
    exp = tmp_path / "extended"
    exp.mkdir()
    for src in healthy.iterdir():  # the run's folder as it was, then resumed in place
        (exp / src.name).symlink_to(src) if src.is_file() else __import__("shutil").copytree(src, exp / src.name,
                                                                                            symlinks=True)
    train.main(args_for(data, exp, *RUN[:1], "18", *RUN[2:], "--resume-checkpoint", str(last_ckpt(exp))))
    h = read_run(exp)
    assert len(h.versions) == 2 and h.last_step == 17 and [s for s, _ in h.points("lr")] == list(range(18))
    assert report.main([str(exp), "--no-labels"]) == 1
    assert "update 3: LR schedule: lr " in capsys.readouterr().out  # decay from update 4 on: 12 -> 18


class Interrupt(pl.Callback):
    """A user's Ctrl-C at update ``at``, after ``slow`` updates that each wait 5 s (a slow rank; long
    enough to halve the throughput on a loaded machine too)."""

    def __init__(self, at: int, slow: range):
        self.at, self.slow = at, slow

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.slow:
            time.sleep(5)
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def test_a_slow_stretch_and_an_interrupted_run_are_found(data, tmp_path, monkeypatch, capsys):
    real_trainer = pl.Trainer
    monkeypatch.setattr(pl, "Trainer", lambda **kw: real_trainer(**{**kw, "callbacks": [
        *kw["callbacks"], Interrupt(at=20, slow=range(9, 14))]}))
    exp = tmp_path / "exp"
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown ends the script with exit status 1
        train.main(args_for(data, exp, "--max-updates", "24", *RUN[2:]))
    (last_ckpt(exp).resolve()).unlink()  # and its newest checkpoint lost
    assert report.main([str(exp), "--no-labels"]) == 1
    out = capsys.readouterr().out
    # the first slow update (global step 9) is logged at step 9, like its loss
    for line in ("update 9: throughput: audio s/s under 0.5x", "update 19: ended early: last logged update 20 of "
                 "--max-updates 24", "lost checkpoints: no readable last.ckpt"):
        assert line in out


class Poison(pl.Callback):
    """NaN audio in ``times`` batches from when update ``at`` is due (a corrupt file, say): losses not finite."""

    def __init__(self, at: int, times: int = 1):
        self.at, self.left = at, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at and self.left:  # skipped, the update is due again next batch
            batch.micro_batches[0][0].fill_(float("nan"))
            self.left -= 1


def test_skipped_updates_and_unused_clusters_are_found_live(data, tmp_path, monkeypatch, caplog):
    """A NaN batch at update 5 (skipped on every rank) and --num-classes 20 for labels of 10 clusters: found as
    they happen, printed once each and logged as health_<check>."""
    real_trainer = pl.Trainer
    monkeypatch.setattr(pl, "Trainer", lambda **kw: real_trainer(**{**kw, "callbacks": [*kw["callbacks"], Poison(5)]}))
    exp = tmp_path / "exp"
    with caplog.at_level(logging.WARNING, logger="health.callback"):
        train.main(args_for(data, exp, *RUN, num_classes=20))
    live = [r.getMessage() for r in caplog.records if r.getMessage().startswith("health: ")]
    assert live[0].startswith("health: update 0: labels: ") and "10 of 20 clusters never occur" in live[0]
    assert live[1].startswith("health: update 5: skipped: 1 update(s) skipped") and len(live) == 2
    assert {"health_labels", "health_skipped"} <= set(logged_health(exp))
    assert checks(report.findings(read_run(exp))) == ["labels", "skipped"]


def test_a_run_whose_updates_keep_being_skipped_stops(data, tmp_path, monkeypatch):
    real_trainer = pl.Trainer
    monkeypatch.setattr(pl, "Trainer", lambda **kw: real_trainer(**{**kw, "callbacks": [*kw["callbacks"],
                                                                                        Poison(5, times=3)]}))
    with pytest.raises(SystemExit, match=r"train.py: error: stopped at update 6: the last 3 updates were all "
                                         r"skipped \(non-finite loss or gradient\); resume from last.ckpt"):
        train.main(args_for(data, tmp_path / "exp", *RUN, "--max-skips-in-a-row", "3"))
    assert load_checkpoint(last_ckpt(tmp_path / "exp"))["global_step"] == 5  # the final state, written


class Labels(list):
    """A label reader stand-in: utterance ids by index, with counts (dataset.label_files' interface)."""

    @property
    def counts(self):
        return [len(x) for x in self]


def test_label_thresholds():
    import numpy as np

    dominated = Labels([np.array([0] * 40 + list(range(10)))] * 3)
    assert [f.message.split(": ", 1)[1] for f in label_findings(dominated, 10, np.array([50, 50, 49]))] == [
        "cluster 0 holds 82% of the frames",
        "1 utterance(s) have label counts that do not match their audio (first: line 3, 50 labels for 49 frames)"]
    assert label_findings(Labels([np.arange(10)]), 10) == []
    assert label_findings(Labels([np.array([3, 12])]), 10)[0] == Finding(
        "labels", 0, "labels: 1 label(s) outside [0, --num-classes 10)")


PAGE = """JSON.stringify({
  charts: [...document.querySelectorAll('svg.chart')].map(svg => ({
    box: [svg.getBoundingClientRect().width, svg.getBoundingClientRect().height],
    lines: [...svg.querySelectorAll('polyline')].map(p => Math.max(p.getBBox().width, p.getBBox().height)),
    band: svg.querySelectorAll('polygon.band').length})),
  findings: [...document.querySelectorAll('#findings tr')].slice(1).map(tr => tr.cells[2].textContent)})"""


def test_the_report_page_renders_offline_in_a_browser(healthy, tmp_path):
    """Debian's Chromium, headless, network cut off: every chart has its size and drawn lines, the trusted run
    gives a band, the findings table lists the findings, and the page asked for nothing but itself."""
    import json

    from tests.browser import Browser

    page = tmp_path / "report.html"
    h = read_run(healthy)
    faulty = [Finding("spike", 7, "x"), Finding("LR schedule", 3, "y")]
    page.write_text(render([("healthy", h, []), ("faulty", h, faulty)], trusted=[h, h]))
    browser = Browser()
    try:
        seen = json.loads(browser.evaluate(browser.open(page), PAGE))
        urls = browser.requested_urls()
    finally:
        browser.close()
    assert urls == [page.as_uri()]
    assert len(seen["charts"]) >= 7 and all(c["box"] == [420, 240] for c in seen["charts"])
    assert all(c["lines"] and min(c["lines"]) > 0 and c["band"] for c in seen["charts"])
    assert seen["findings"] == ["spike", "LR schedule"]


def test_a_folder_without_logs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"report.py: error: .*: no lightning_logs/version_\*/metrics.csv"):
        report.main([str(tmp_path)])


@pytest.mark.parametrize("case", ["hparams_malformed", "hparams_code", "hparams_list", "metric_text", "no_step"])
def test_a_malformed_log_file_is_named_by_report(tmp_path, case):
    """hparams.yaml and metrics.csv from elsewhere: an error naming the file, never a traceback, and yaml
    constructs no Python object (a tag that would run code when loaded with yaml's full loader is refused)."""
    version = tmp_path / "lightning_logs" / "version_0"
    version.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    metrics, hparams = "step,train_loss\n0,1.5\n1,1.2\n", "betas: !!python/tuple\n- 0.9\n- 0.98\n"
    if case == "hparams_malformed":
        hparams = "betas: [0.9, 0.98\nseed: 1\n"
    elif case == "hparams_code":
        hparams = f"x: !!python/object/apply:builtins.exec [\"open('{marker}', 'w')\"]\n"
    elif case == "hparams_list":
        hparams = "- 1\n- 2\n"
    elif case == "metric_text":
        metrics += "2,nan?\n"
    else:
        metrics = "epoch,train_loss\n0,1.5\n"
    (version / "metrics.csv").write_text(metrics)
    (version / "hparams.yaml").write_text(hparams)
    where = {"metric_text": "metrics.csv:4: column 'train_loss' is not a number",
             "no_step": "metrics.csv: not a Lightning metrics.csv"}.get(case, "hparams.yaml: not a Lightning hparams")
    with pytest.raises(SystemExit, match=f"report.py: error: {version}/{where}"):
        report.main([str(tmp_path), "--no-labels"])
    assert not marker.exists()


def test_lightnings_hparams_tuples_are_read(tmp_path):
    version = tmp_path / "lightning_logs" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("step,train_loss\n0,1.5\n")
    (version / "hparams.yaml").write_text("betas: !!python/tuple\n- 0.9\n- 0.98\nseed: 3\n")
    assert read_run(tmp_path).hparams == {"betas": (0.9, 0.98), "seed": 3}


def history(hparams=None, **series):
    from pathlib import Path

    from health.history import RunHistory

    return RunHistory(Path("."), hparams or {}, {k: list(enumerate(v)) for k, v in series.items()})


def test_spike_divergence_and_falling_accuracy_thresholds():
    """The thresholds on made-up histories (real runs that spike or diverge take longer than a test may)."""
    from health.checks import falling, loss_spikes

    flat = [5.0] * 30
    assert loss_spikes(history(train_loss_step=flat)) == []
    spiked = flat[:20] + [9.1] + flat[21:]  # over 1.8x the median 5.0 of the ten before it
    assert checks(loss_spikes(history(train_loss_step=spiked))) == ["spike"]
    assert loss_spikes(history(train_loss_step=flat[:20] + [8.9] + flat[21:])) == []
    assert loss_spikes(history({"decay_updates": 1}, train_loss_step=spiked)) == []  # fine-tuning: 2.5x
    assert checks(loss_spikes(history({"decay_updates": 1}, train_loss_step=flat[:20] + [12.6] + flat[21:]))) == [
        "spike"]
    assert loss_spikes(history({"warmup_updates": 25}, train_loss_step=spiked)) == []  # in the warm-up
    rising = [5.0 - 0.1 * i for i in range(20)] + [3.1 + 0.2 * i for i in range(20)]
    # found after the ten values with the lowest median (updates 12-21, around the turn at 19)
    assert [(f.check, f.step) for f in loss_spikes(history(train_loss_step=rising))] == [("divergence", 22)]
    assert falling(history(val_masked_accuracy=[0.20, 0.21, 0.205, 0.20, 0.199])) == [Finding(
        "accuracy falling", 2, "val_masked_accuracy went 0.21 -> 0.199 over 3 validations")]
    assert falling(history(val_masked_accuracy=[0.20, 0.21, 0.209, 0.208, 0.207])) == []  # by less than 0.01
    assert falling(history({"decay_updates": 1}, val_cer=[0.9, 0.8, 0.82, 0.84, 0.86]))[0].step == 2
