"""preprocess.py end to end on real FLAC files: upstream's output files, the same k-means and labels as the
old dump-everything path, valid labelled with the train model, the HuBERT path with a --percent sample, bad
audio, --rank jobs and resuming, the torch.distributed.run path, --use-gpu.

No test here may have "train" in its name (see tests/test_common_utils.py).
"""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from bench.fault_campaign import file_content
from dataset.label_files import open_labels
from preprocess import main, parse_args, pick_device
from tests.numerics import assert_fp32_close
from tests.test_common_utils import make_corpus, tone
from tests.test_feature_utils import save_checkpoint
from tests.test_kmeans import old_gather, write_upstream_shard
from utils.common_utils import BadAudioError
from utils.feature_shards import load_shard
from utils.feature_utils import hubert_extractor, mfcc_extractor, read_shards
from utils.kmeans import fit_kmeans, load_centers, predict

REPO = Path(__file__).resolve().parents[1]


def run_args(root, exp, *extra):
    return ["--root-dir", str(root), "--exp-dir", str(exp), "--num-cluster", "4", "--num-rank", "3",
            "--valid-percent", "0.3", *extra]


def files_of(folder):
    """Name -> bytes of every file (of a label line index: what it indexes; it also holds its file's mtime)."""
    return {p.relative_to(folder).as_posix(): file_content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def tsv_samples(data_dir, split):
    lines = (data_dir / f"tsv/librispeech_{split}.tsv").read_text().splitlines()[1:]
    return [int(line.split("\t")[1]) for line in lines]


def old_path(data, extractor, old_dir, num_rank, percent=-1, seed=0, num_cluster=4):
    """What preprocess.py made of the same file lists before it streamed: the features of every utterance of
    both splits dumped as upstream's shards, k-means fitted on the gathered (sampled) train rows, and each
    stored shard labelled whole with the given model. Returns (centres of that fit, a function giving the
    label file text of a split for centres)."""
    shards = {split: read_shards(data / f"tsv/librispeech_{split}.tsv", split, num_rank)
              for split in ("train", "valid")}
    for split_shards in shards.values():
        for shard in split_shards:
            feats = [extractor.extract(shard.waveform(i)) for i in range(len(shard.lines))]
            write_upstream_shard(old_dir, shard.split, shard.rank, num_rank,
                                 torch.cat(feats) if feats else torch.zeros(0, extractor.dim), [len(f) for f in feats])
    centers = fit_kmeans(old_gather(old_dir, "train", num_rank, percent, seed).numpy(), num_cluster, seed)

    def labels(split, model_centers):
        lines = []
        for rank in range(1, num_rank + 1):
            feats, lengths = load_shard(old_dir, split, rank, num_rank)
            lines += [" ".join(map(str, x.tolist())) + "\n"
                      for x in predict(feats, model_centers).split(lengths.tolist())]
        return "".join(lines)

    return centers.cluster_centers_, labels


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
    shards = [f"train_{r}_3" for r in (1, 2, 3)]
    assert set(files_of(reference)) == {
        "tsv/librispeech_train.tsv", "tsv/librispeech_valid.tsv", "km_model/model.npy", "km_model/model.done",
        "label/label_train.pt", "label/label_valid.pt", "label/label_train.done", "label/label_valid.done",
        "label/label_train.pt.index.npz", "label/label_valid.pt.index.npz",
        *(f"feat/{name}.npy" for name in shards), *(f"feat/len_{name}.pt" for name in shards),
        *(f"feat/{name}.done" for name in shards)}  # valid's features are never stored: only labelled
    assert load_centers(reference / "km_model", "cpu").shape == (4, 39)
    for split in ("train", "valid"):
        frames = [(n - 400) // 160 + 1 for n in tsv_samples(reference, split)]  # MFCC frames: 100 Hz
        if split == "train":
            lens = []
            for rank in (1, 2, 3):
                feats, shard_lens = load_shard(reference / "feat", split, rank, 3)
                assert feats.dtype == torch.float32 and feats.shape == (int(shard_lens.sum()), 39)
                assert torch.load(reference / f"feat/len_{split}_{rank}_3.pt").dtype == torch.float32
                lens += shard_lens.tolist()
            assert lens == frames
        lines = (reference / f"label/label_{split}.pt").read_text().splitlines()
        assert [len(line.split()) for line in lines] == frames
        assert {int(x) for line in lines for x in line.split()} <= set(range(4))


def test_same_seed_same_bytes_and_the_old_paths_centres_and_labels(corpus, reference, tmp_path):
    main(run_args(corpus, tmp_path))
    assert files_of(tmp_path / "data/mfcc") == files_of(reference)
    centers, old_labels = old_path(reference, mfcc_extractor(), tmp_path / "old", 3)
    assert np.array_equal(np.load(reference / "km_model/model.npy", allow_pickle=False), centers)
    for split in ("train", "valid"):  # valid is labelled with the model fitted on train
        assert (reference / f"label/label_{split}.pt").read_text() == old_labels(split, torch.from_numpy(centers))


def test_npy_labels_are_the_text_labels(corpus, reference, tmp_path):
    """--label-format npy on the reference's run: the same ids; switching formats relabels and leaves one format."""
    data = tmp_path / "data/mfcc"
    main(run_args(corpus, tmp_path, "--label-format", "npy"))
    for split in ("train", "valid"):
        read = open_labels(data / "label", split)
        text = (reference / f"label/label_{split}.pt").read_text().splitlines()
        assert [read[i].tolist() for i in range(len(read))] == [list(map(int, line.split())) for line in text]
    assert sorted(p.name for p in (data / "label").iterdir()) == [
        "label_train.done", "label_train.npy", "label_train.offsets.npy",
        "label_valid.done", "label_valid.npy", "label_valid.offsets.npy"]
    main(run_args(corpus, tmp_path))
    assert files_of(data) == files_of(reference)


def test_hubert_run_from_a_conv2d_checkpoint_stores_only_the_kmeans_sample(corpus, tmp_path):
    model = save_checkpoint(tmp_path / "itr1.ckpt", use_conv2d=True)
    main(["--root-dir", str(corpus), "--exp-dir", str(tmp_path / "exp"), "--feat-type", "hubert",
          "--layer-index", "2", "--checkpoint-path", str(tmp_path / "itr1.ckpt"), "--num-rank", "2",
          "--num-cluster", "4", "--percent", "0.5", "--valid-percent", "0.3", "--device", "auto"])
    data = tmp_path / "exp/data/hubert_2"
    assert load_centers(data / "km_model", "cpu").shape == (4, 256)
    samples = tsv_samples(data, "train")
    lines = (data / "label/label_train.pt").read_text().splitlines()
    assert [len(line.split()) for line in lines] == [(n - 400) // 320 + 1 for n in samples]  # 50 Hz
    # Only the sampled utterances' features are on disk (half of each shard's 3), none of valid.
    assert sorted(p.name for p in (data / "feat").glob("*.npy")) == ["train_1_2.npy", "train_2_2.npy"]
    feats, lengths = load_shard(data / "feat", "train", 1, 2)
    shard = read_shards(data / "tsv/librispeech_train.tsv", "train", 2)[0]
    first = next(i for i in range(3) if (shard.num_samples()[i] - 400) // 320 + 1 == lengths[0])
    model.eval()
    with torch.no_grad():
        expected = model.wav2vec2.extract_features(shard.waveform(first)[None], num_layers=2)[0][-1][0]
    assert len(lengths) == 1
    assert_fp32_close(feats, expected)  # what preprocess.py's fp32 run stores, against the model alone
    # The same centres and labels as dumping every utterance and labelling the dumped shards.
    extractor = hubert_extractor(tmp_path / "itr1.ckpt", 2, "cpu")
    centers, old_labels = old_path(data, extractor, tmp_path / "old", 2, percent=0.5)
    assert np.array_equal(np.load(data / "km_model/model.npy", allow_pickle=False), centers)
    for split in ("train", "valid"):
        assert (data / f"label/label_{split}.pt").read_text() == old_labels(split, torch.from_numpy(centers))


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
    soundfile.write(folder / "cut.flac", tone(48000, 200, 8), 16000)
    flac = (folder / "cut.flac").read_bytes()
    (folder / "cut.flac").write_bytes(flac[:len(flac) // 2])  # header intact: it still says 48000 samples
    exp = root / "exp"
    args = ["--root-dir", str(root), "--exp-dir", str(exp), "--num-cluster", "4", "--num-rank", "2",
            "--valid-percent", "0"]
    with pytest.raises(BadAudioError) as error:
        main(args)
    for name in ("corrupt.flac", "rate8k.flac", "stereo.flac", "tiny.flac", "cut.flac"):
        assert str(folder / name) in str(error.value)
    assert str(error.value).startswith("5 bad audio file(s)")
    assert not (exp / "data/mfcc/feat").exists()

    caplog.set_level(logging.INFO)
    main(args + ["--skip-bad"])
    data = exp / "data/mfcc"
    assert tsv_samples(data, "train") == [6000, 6999, 7998]
    assert sorted(p.name for p in (data / "label").iterdir()) == [
        "label_train.done", "label_train.pt", "label_train.pt.index.npz"]  # no valid
    assert "done: 3 train / 0 valid files (5 skipped)" in caplog.text


def test_rank_jobs_then_resume_after_interruption(corpus, reference, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = tmp_path / "data/mfcc"
    main(run_args(corpus, tmp_path, "--rank", "2"))  # one job of a manual split: shard 2's k-means features
    assert sorted(p.name for p in (data / "feat").iterdir()) == ["len_train_2_3.pt", "train_2_3.done", "train_2_3.npy"]
    assert not (data / "km_model").exists()
    main(run_args(corpus, tmp_path, "--fit-only"))  # the other shards' features, then the fit
    assert (data / "km_model/model.done").is_file() and not (data / "label").exists()
    listed = {p: p.stat().st_mtime_ns for p in (data / "tsv").iterdir()}
    main(run_args(corpus, tmp_path, "--rank", "2"))  # k-means is fitted: now shard 2's labels
    assert {p: p.stat().st_mtime_ns for p in (data / "tsv").iterdir()} == listed  # a --rank job does not re-list
    assert sorted(p.name for p in (data / "label").iterdir()) == [
        "label_train_2_3.done", "label_train_2_3.part", "label_valid_2_3.done", "label_valid_2_3.part"]
    caplog.clear()
    main(run_args(corpus, tmp_path))  # the other shards' labels, then the label files
    assert "train 2/3 labels are already done" in caplog.text and "valid 2/3 labels are already done" in caplog.text
    assert "train 1/3 labels are already done" not in caplog.text
    assert files_of(data) == files_of(reference)

    # Interrupted before the fit: a feature shard and the model are gone. Only they are redone.
    (data / "feat/train_3_3.npy").unlink()
    (data / "km_model/model.npy").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}
    main(run_args(corpus, tmp_path))
    assert files_of(data) == files_of(reference)
    changed = {p.relative_to(data).as_posix() for p in data.rglob("*")
               if p.is_file() and stamps.get(p) != p.stat().st_mtime_ns}
    assert changed == {"feat/train_3_3.npy", "feat/len_train_3_3.pt", "feat/train_3_3.done", "km_model/model.npy",
                       "km_model/model.done", "tsv/librispeech_train.tsv", "tsv/librispeech_valid.tsv"}

    # A label file is gone: only that split is relabelled.
    (data / "label/label_valid.pt").unlink()
    stamp = (data / "label/label_train.pt").stat().st_mtime_ns
    main(run_args(corpus, tmp_path))
    assert files_of(data) == files_of(reference) and (data / "label/label_train.pt").stat().st_mtime_ns == stamp

    # Another split changes the TSVs: every shard follows the new file lists.
    main(run_args(corpus, tmp_path, "--valid-percent", "0.5"))
    for split in ("train", "valid"):
        lines = (data / f"label/label_{split}.pt").read_text().splitlines()
        assert [len(line.split()) for line in lines] == [(n - 400) // 160 + 1 for n in tsv_samples(data, split)]
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
                ["--rank", "6"], ["--percent", "0"], ["--rank", "1", "--fit-only"], ["--audio-check", "some"]):
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
