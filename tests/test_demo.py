"""tools/demo.py end to end on the embedded corpus, with a few updates per iteration."""
import json

import torch

from tools.demo import main


def test_demo_runs_both_iterations_and_reports(tmp_path, capsys):
    rows, finetuned = main(["--out", str(tmp_path / "demo"), "--updates", "4", "4", "--num-cluster", "20",
                            "--layer-index", "2", "--finetune-updates", "5"])
    assert [r[0] for r in rows] == ["iteration 1", "iteration 2"]
    for _, _, pnmi_seen, pnmi_unseen, acc, prior, ckpts, logs, _ in rows:
        assert 0 < pnmi_seen < 1 and 0 < pnmi_unseen < 1 and 0 <= acc <= 1 and 0 < prior < 1
        assert (ckpts / "last.ckpt").is_file() and any(logs.glob("version_*/metrics.csv"))
    assert [name for name, *_ in finetuned] == ["iteration 2", "random init"]
    for _, counts, _ in finetuned:
        assert counts.chars > 0 and 0 <= counts.cer  # every held-out utterance decoded and scored
    for tag in ("iter2", "random"):
        ckpt = torch.load(tmp_path / "demo" / f"finetune_{tag}" / "checkpoints_hubert_pretrain_tiny" / "last.ckpt",
                          weights_only=True)
        assert ckpt["global_step"] == 5 and "aux.weight" in ckpt["state_dict"]
    for png in ("curves.png", "finetune_curves.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "iteration 2" in out and "held-out CER" in out and "curves:" in out
    assert "not compared with the trusted runs: they were made with the default flags" in out
    figures = json.loads((tmp_path / "demo" / "figures.json").read_text())
    assert figures["seed"] == 1337 and figures["figures"]["fine-tuning from iteration 2"]["cer"] == finetuned[0][1].cer
    assert figures["figures"]["iteration 1"]["ratio"] == rows[0][4] / rows[0][5]
