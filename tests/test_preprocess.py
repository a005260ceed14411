"""preprocess.py end to end on real FLAC files: upstream's output files, determinism, valid labelled with
the train model, the HuBERT path, bad input, resuming, --rank, the torch.distributed.run path, --use-gpu.

No test here may have "train" in its name (see tests/test_common_utils.py).
"""
import logging
import subprocess
import sys
from pathlib import Path

import joblib
import pytest
import soundfile
import torch
from sklearn.cluster import MiniBatchKMeans

from preprocess import main, parse_args, pick_device
from tests.test_common_utils import make_corpus, tone
from tests.test_feature_utils import save_checkpoint
from utils.common_utils import BadAudioError
from utils.kmeans import fit_kmeans, predict

REPO = Path(__file__).resolve().parents[1]


def run_args(root, exp, *extra):
    return ["--root-dir", str(root), "--exp-dir", str(exp), "--num-cluster", "4", "--num-rank", "3",
            "--valid-percent", "0.3", *extra]


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tsv_samples(data_dir, split):
    lines = (data_dir / f"tsv/librispeech_{split}.tsv").read_text().splitlines()[1:]
    return [int(line.split("\t")[1]) for line in lines]


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root)
    return root


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The MFCC outputs of a plain sequential run."""
    exp = tmp_path_factory.mktemp("exp")
    main(run_args(corpus, exp))
    return exp / "data" / "mfcc"


def test_mfcc_run_writes_upstream_files(reference):
    shards = [f"{s}_{r}_3" for s in ("train", "valid") for r in (1, 2, 3)]
    assert set(files_of(reference)) == {
        "tsv/librispeech_train.tsv", "tsv/librispeech_valid.tsv", "km_model/model.pt", "km_model/model.done",
        "label/label_train.pt", "label/label_valid.pt",
        *(f"feat/{name}.pt" for name in shards), *(f"feat/len_{name}.pt" for name in shards),
        *(f"feat/{name}.done" for name in shards)}
    km = joblib.load(reference / "km_model/model.pt")
    assert isinstance(km, MiniBatchKMeans) and km.cluster_centers_.shape == (4, 39)
    for split in ("train", "valid"):
        samples = tsv_samples(reference, split)
        frames = [(n - 400) // 160 + 1 for n in samples]  # MFCC frames: 100 Hz
        lens = []
        for rank in (1, 2, 3):
            feats = load(reference / f"feat/{split}_{rank}_3.pt")
            shard_lens = load(reference / f"feat/len_{split}_{rank}_3.pt")
            assert feats.dtype == shard_lens.dtype == torch.float32 and shard_lens.ndim == 1
            assert feats.shape == (int(shard_lens.sum()), 39)
            lens += shard_lens.int().tolist()
        assert lens == frames
        lines = (reference / f"label/label_{split}.pt").read_text().splitlines()
        assert [len(line.split()) for line in lines] == frames
        assert {int(x) for line in lines for x in line.split()} <= set(range(4))


def test_same_seed_same_bytes_and_valid_uses_the_model_fitted_on_train(corpus, reference, tmp_path):
    main(run_args(corpus, tmp_path))
    assert files_of(tmp_path / "data/mfcc") == files_of(reference)

    def split_feats(split):
        return torch.cat([load(reference / f"feat/{split}_{r}_3.pt") for r in (1, 2, 3)])

    centers = joblib.load(reference / "km_model/model.pt").cluster_centers_
    assert (fit_kmeans(split_feats("train").numpy(), 4, 0).cluster_centers_ == centers).all()
    labels = predict(split_feats("valid"), torch.as_tensor(centers, dtype=torch.float32)).tolist()
    written = (reference / "label/label_valid.pt").read_text().split()
    assert [int(x) for x in written] == labels


def test_hubert_run_from_a_conv2d_checkpoint(corpus, tmp_path):
    model = save_checkpoint(tmp_path / "itr1.ckpt", use_conv2d=True)
    main(["--root-dir", str(corpus), "--exp-dir", str(tmp_path / "exp"), "--feat-type", "hubert",
          "--layer-index", "2", "--checkpoint-path", str(tmp_path / "itr1.ckpt"), "--num-rank", "2",
          "--num-cluster", "4", "--percent", "0.5", "--valid-percent", "0.3", "--device", "auto"])
    data = tmp_path / "exp/data/hubert_2"
    assert joblib.load(data / "km_model/model.pt").cluster_centers_.shape == (4, 256)
    samples = tsv_samples(data, "train")
    lines = (data / "label/label_train.pt").read_text().splitlines()
    assert [len(line.split()) for line in lines] == [(n - 400) // 320 + 1 for n in samples]  # 50 Hz
    feats = load(data / "feat/train_1_2.pt")
    root, first = (data / "tsv/librispeech_train.tsv").read_text().splitlines()[:2]
    waveform = torch.from_numpy(soundfile.read(f"{root}/{first.split()[0]}", dtype="float32")[0])
    model.eval()
    with torch.no_grad():
        expected = model.wav2vec2.extract_features(waveform[None], num_layers=2)[0][-1][0]
    torch.testing.assert_close(feats[:len(expected)], expected, atol=1e-5, rtol=0)


def test_bad_audio_stops_before_any_work_or_is_skipped(tmp_path_factory, caplog):
    root = tmp_path_factory.mktemp("mixed")
    folder = root / "train-clean-100/7/7"
    folder.mkdir(parents=True)
    for i in range(3):
        soundfile.write(folder / f"good{i}.flac", tone(6000 + 999 * i, 200, i), 16000)
    (folder / "corrupt.flac").write_bytes(b"\x00\x01garbage" * 100)
    soundfile.write(folder / "rate8k.flac", tone(8000, 200, 5), 8000)
    soundfile.write(folder / "stereo.flac", tone(8000, 200, 6, channels=2), 16000)
    soundfile.write(folder / "tiny.flac", tone(100, 200, 7), 16000)
    exp = root / "exp"
    args = ["--root-dir", str(root), "--exp-dir", str(exp), "--num-cluster", "4", "--num-rank", "2",
            "--valid-percent", "0"]
    with pytest.raises(BadAudioError) as error:
        main(args)
    for name in ("corrupt.flac", "rate8k.flac", "stereo.flac", "tiny.flac"):
        assert str(folder / name) in str(error.value)
    assert str(error.value).startswith("4 bad audio file(s)")
    assert not (exp / "data/mfcc/feat").exists()

    caplog.set_level(logging.INFO)
    main(args + ["--skip-bad"])
    data = exp / "data/mfcc"
    assert tsv_samples(data, "train") == [6000, 6999, 7998]
    assert sorted(p.name for p in (data / "label").iterdir()) == ["label_train.pt"]  # no valid split
    assert "done: 3 train / 0 valid files (4 skipped)" in caplog.text


def test_rank_jobs_then_resume_after_interruption(corpus, reference, tmp_path):
    main(run_args(corpus, tmp_path, "--rank", "2"))  # one job of a manual split: shard 2 only
    data = tmp_path / "data/mfcc"
    assert sorted(p.name for p in (data / "feat").glob("*.pt")) == [
        "len_train_2_3.pt", "len_valid_2_3.pt", "train_2_3.pt", "valid_2_3.pt"]
    assert not (data / "km_model").exists()
    main(run_args(corpus, tmp_path))  # finishes the other shards, fits k-means, labels
    assert files_of(data) == files_of(reference)

    # Interrupted: a shard and the labels are gone. Only the missing shard is recomputed.
    (data / "feat/train_3_3.pt").unlink()
    for label in (data / "label").iterdir():
        label.unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in (data / "feat").iterdir()}
    main(run_args(corpus, tmp_path))
    assert files_of(data) == files_of(reference)
    changed = {p.name for p in (data / "feat").iterdir() if stamps.get(p.name) != p.stat().st_mtime_ns}
    assert changed == {"train_3_3.pt", "len_train_3_3.pt", "train_3_3.done"}

    # Another split changes the TSVs: every shard follows the new file lists.
    main(run_args(corpus, tmp_path, "--valid-percent", "0.5"))
    for split in ("train", "valid"):
        lens = torch.cat([load(data / f"feat/len_{split}_{r}_3.pt") for r in (1, 2, 3)]).int().tolist()
        assert lens == [(n - 400) // 160 + 1 for n in tsv_samples(data, split)]
    assert tsv_samples(data, "valid") != tsv_samples(reference, "valid")


def test_torch_distributed_run_gives_the_same_bytes(corpus, reference, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "preprocess.py",
         *run_args(corpus, tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 6 train / 2 valid files (0 skipped)" in result.stderr
    assert files_of(tmp_path / "data/mfcc") == files_of(reference)


@pytest.mark.parametrize("flag, expected", [([], False), (["--use-gpu"], True), (["--use-gpu", "True"], True),
                                            (["--use-gpu", "False"], False), (["--use-gpu", "0"], False),
                                            (["--use-gpu", "yes"], True), (["--use-gpu", "NO"], False)])
def test_use_gpu_parsing(flag, expected):
    args = parse_args(["--root-dir", "r", "--exp-dir", "e", *flag, "--num-cluster", "7"])
    assert args.use_gpu is expected and args.num_cluster == 7


def test_bad_flags_are_refused(capsys):
    for bad in (["--use-gpu", "maybe"], ["--use-gpu", "--device", "cpu"], ["--feat-type", "hubert"],
                ["--rank", "6"], ["--percent", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--root-dir", "r", "--exp-dir", "e", *bad])
    assert "expected one of true/1/yes/false/0/no, got 'maybe'" in capsys.readouterr().err
    assert pick_device(parse_args(["--root-dir", "r", "--exp-dir", "e"]), 0) == torch.device("cpu")
    gpu = parse_args(["--root-dir", "r", "--exp-dir", "e", "--use-gpu"])
    if torch.cuda.is_available():
        assert pick_device(gpu, 0) == torch.device("cuda", 0)
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device(gpu, 0)
