"""HuBERTDataSet on real FLAC/TSV/label files, and CollateFnHubert's crop/pad/align arithmetic."""
import pickle

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

from dataset import BucketizeBatchSampler, CollateFnHubert, HuBERTDataSet, expected_num_labels
from dataset.label_files import NpyLabels
from tests.test_label_files import write_npy

LENGTHS = [32000, 33111, 40000, 35555, 48320, 32400]


def conv_output_length(n: int) -> int:
    """Output length of HuBERT's 7-layer conv feature extractor, layer by layer."""
    for kernel, stride in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:
        n = (n - kernel) // stride + 1
    return n


def mfcc_labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 100, size=(n - 400) // 160 + 1)


def write_exp_dir(tmp_path, lengths=LENGTHS, subset="train"):
    """Upstream layout: root/<spk>/<id>.flac, tsv/librispeech_<subset>.tsv, label/label_<subset>.pt."""
    root = tmp_path / "LibriSpeech"
    exp = tmp_path / "exp"
    (exp / "tsv").mkdir(parents=True)
    (exp / "label").mkdir()
    rows, labels, audio = [], [], []
    for i, n in enumerate(lengths):
        rel = f"{i % 2}/utt{i}.flac"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pcm = np.random.default_rng(i).integers(-2000, 2000, size=n, dtype=np.int16)
        soundfile.write(root / rel, pcm, 16000, subtype="PCM_16")
        rows.append(f"{rel}\t{n}")
        labels.append(mfcc_labels(n, i))
        audio.append(pcm)
    (exp / "tsv" / f"librispeech_{subset}.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
    (exp / "label" / f"label_{subset}.pt").write_text("".join(" ".join(map(str, lab)) + "\n" for lab in labels))
    return exp, audio, labels


def test_items_match_the_files(tmp_path):
    exp, audio, labels = write_exp_dir(tmp_path)
    ds = HuBERTDataSet(exp, "librispeech", "train", feature_type="mfcc")
    assert len(ds) == len(LENGTHS)
    np.testing.assert_array_equal(ds.len_list, LENGTHS)
    for i in range(len(ds)):
        waveform, label, n = ds[i]
        assert waveform.dtype == torch.float32 and waveform.shape == (1, LENGTHS[i]) and n == LENGTHS[i]
        np.testing.assert_array_equal(waveform[0].numpy(), audio[i] / 32768.0)
        assert label.dtype == torch.int64
        np.testing.assert_array_equal(label.numpy(), labels[i])


def test_label_file_without_final_newline(tmp_path):
    exp, _, labels = write_exp_dir(tmp_path)
    path = exp / "label" / "label_train.pt"
    path.write_text(path.read_text().rstrip("\n"))
    ds = HuBERTDataSet(exp, "librispeech", "train")
    np.testing.assert_array_equal(ds[len(ds) - 1][1].numpy(), labels[-1])


def test_label_line_count_must_match_tsv(tmp_path):
    exp, _, _ = write_exp_dir(tmp_path)
    path = exp / "label" / "label_train.pt"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    n = len(LENGTHS)
    with pytest.raises(ValueError, match=rf"label_train.pt: has {n - 1} label lines .* lists {n} utterances"):
        HuBERTDataSet(exp, "librispeech", "train")
    path.write_text("")
    with pytest.raises(ValueError, match=rf"label_train.pt: has 0 label lines .* lists {n} utterances"):
        HuBERTDataSet(exp, "librispeech", "train")


def test_labels_at_the_wrong_rate_name_the_file(tmp_path):
    exp, _, _ = write_exp_dir(tmp_path)
    HuBERTDataSet(exp, "librispeech", "train", feature_type="mfcc")
    want = (LENGTHS[0] - 400) // 320 + 1
    with pytest.raises(ValueError, match=rf"label_train.pt:1: 198 labels, but .*utt0.flac has 32000 samples, "
                                         rf"which needs {want} labels for feature type 'hubert'"):
        HuBERTDataSet(exp, "librispeech", "train", feature_type="hubert")


def test_missing_audio_and_wrong_length_are_named(tmp_path):
    exp, _, _ = write_exp_dir(tmp_path)
    tsv = exp / "tsv" / "librispeech_train.tsv"
    good = tsv.read_text()
    tsv.write_text(good.replace("utt3.flac", "gone.flac"))
    with pytest.raises(FileNotFoundError, match=r"1 listed audio file\(s\) do not exist, first: .*/1/gone.flac"):
        HuBERTDataSet(exp, "librispeech", "train")
    tsv.write_text(good.replace("\t40000", "\t40001"))
    with pytest.raises(ValueError, match=r"librispeech_train.tsv: 1 listed audio file\(s\) do not have the sample "
                                         r"count it lists .*utt2.flac \(line 4\): 40000 samples, listed as 40001"):
        HuBERTDataSet(exp, "librispeech", "train")  # at start-up, not when training reaches the file
    tsv.write_text(good)
    ds = HuBERTDataSet(exp, "librispeech", "train")
    path = exp.parent / "LibriSpeech" / "0" / "utt2.flac"
    soundfile.write(path, np.zeros(39990, dtype=np.int16), 16000)  # changed after start-up
    with pytest.raises(ValueError, match=r"utt2.flac: has 39990 samples but .*librispeech_train.tsv says 40000"):
        ds[2]
    soundfile.write(path, np.full(40000, np.nan, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(ValueError, match=r"utt2.flac: sample 0 is NaN or inf"):
        ds[2]


def test_malformed_inputs_are_named(tmp_path):
    exp, _, _ = write_exp_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="librispeech_valid.tsv"):
        HuBERTDataSet(exp, "librispeech", "valid")
    tsv = exp / "tsv" / "librispeech_train.tsv"
    tsv.write_text(tsv.read_text().replace("\t33111", " 33111"))
    with pytest.raises(ValueError, match=r"librispeech_train.tsv:3: expected"):
        HuBERTDataSet(exp, "librispeech", "train")
    exp2, _, _ = write_exp_dir(tmp_path / "b")
    labels = exp2 / "label" / "label_train.pt"
    labels.write_text(labels.read_text().replace("\n", " x\n", 1))
    with pytest.raises(ValueError, match=r"label_train.pt:1: not a line of integer labels"):
        HuBERTDataSet(exp2, "librispeech", "train")[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_with_workers(tmp_path, num_workers):
    exp, audio, labels = write_exp_dir(tmp_path)
    ds = pickle.loads(pickle.dumps(HuBERTDataSet(exp, "librispeech", "train", feature_type="mfcc")))
    sampler = BucketizeBatchSampler(ds.len_list, num_buckets=2, min_len=32000, max_len=48320,
                                    max_token_count=100000, shuffle=False)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=CollateFnHubert("mfcc", pad=False, rand_crop=False))
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [len(b) for b in sampler]
    for (waveforms, labs, lengths), indices in zip(batches, sampler):
        t = min(LENGTHS[i] for i in indices)
        assert waveforms.shape == (len(indices), t) and labs.shape == (len(indices), (t - 400) // 320 + 1)
        assert lengths.tolist() == [t] * len(indices)
        for row, i in enumerate(indices):  # rand_crop=False keeps the start of every utterance
            np.testing.assert_array_equal(waveforms[row].numpy(), audio[i][:t] / 32768.0)
            np.testing.assert_array_equal(labs[row].numpy(), labels[i][::2][:labs.shape[1]])


def test_mfcc_label_count_equals_conv_output_length():
    sizes = list(range(400, 300001, 37)) + [400, 719, 720, 1039, 1040, 32000, 250000, 250001, 300000]
    for n in sizes:
        mfcc_after_downsampling = len(range(expected_num_labels(n, "mfcc"))[::2])
        assert mfcc_after_downsampling == expected_num_labels(n, "hubert") == conv_output_length(n)
    collate = CollateFnHubert("mfcc", rand_crop=False)
    for n in [400, 719, 720, 32000, 250001]:
        _, labels, _ = collate([(torch.zeros(1, n), torch.arange(expected_num_labels(n, "mfcc")), n)])
        assert labels.shape == (1, conv_output_length(n))


def test_single_frame_utterance():
    for feature_type in ["mfcc", "hubert"]:
        waveforms, labels, lengths = CollateFnHubert(feature_type)([(torch.ones(1, 400), torch.tensor([7]), 400)])
        assert waveforms.shape == (1, 400) and labels.tolist() == [[7]] and lengths.tolist() == [400]


@pytest.mark.parametrize("feature_type", ["mfcc", "hubert"])
def test_random_crop_keeps_labels_on_their_frames(feature_type):
    """Audio = sample index and labels = frame index, so every crop can be checked exactly: label j is
    the first original 50 Hz frame that overlaps the cropped window's frame j."""
    hop = {"mfcc": 160, "hubert": 320}[feature_type]
    collate = CollateFnHubert(feature_type)
    gen = np.random.default_rng(0)
    offsets = set()
    for trial in range(300):
        sizes = [int(gen.integers(400, 6000)) for _ in range(3)]
        batch = [(torch.arange(n, dtype=torch.float32)[None], torch.arange(expected_num_labels(n, feature_type)), n)
                 for n in sizes]
        waveforms, labels, lengths = collate(batch)
        t = min(sizes)
        assert waveforms.shape == (3, t) and labels.shape == (3, (t - 400) // 320 + 1) and lengths.tolist() == [t] * 3
        for row in range(3):
            o = int(waveforms[row, 0])
            offsets.add(o % 320)
            assert 0 <= o <= sizes[row] - t
            assert torch.equal(waveforms[row], torch.arange(o, o + t, dtype=torch.float32))
            frames = labels[row] * hop // 320  # original 50 Hz frame of each label
            first = max((o - 400) // 320 + 1, 0)
            assert frames.tolist() == list(range(first, first + labels.shape[1]))
            starts = o + 320 * torch.arange(labels.shape[1])
            assert torch.all((320 * frames - starts).abs() < 400)  # the two 400-sample windows overlap
    assert 0 in offsets and len(offsets) > 100  # crops on and off the 320-sample grid were exercised


def test_crop_uses_the_global_rng():
    batch = [(torch.arange(n, dtype=torch.float32)[None], torch.arange(expected_num_labels(n, "hubert")), n)
             for n in [4000, 9000, 20000, 30000]]
    collate = CollateFnHubert("hubert")
    torch.manual_seed(1)
    first = collate(batch)[0]
    torch.manual_seed(1)
    assert torch.equal(collate(batch)[0], first)
    torch.manual_seed(2)
    assert not torch.equal(collate(batch)[0], first)
    assert CollateFnHubert("hubert", rand_crop=False)(batch)[0][:, 0].tolist() == [0, 0, 0, 0]


def test_crop_from_a_generator_ignores_the_global_rng():
    batch = [(torch.arange(n, dtype=torch.float32)[None], torch.arange(expected_num_labels(n, "hubert")), n)
             for n in [4000, 9000, 20000, 30000]]
    collate = CollateFnHubert("hubert")
    torch.manual_seed(1)
    first = collate(batch, generator=torch.Generator().manual_seed(7))[0]
    torch.manual_seed(2)
    assert torch.equal(collate(batch, generator=torch.Generator().manual_seed(7))[0], first)
    assert not torch.equal(collate(batch, generator=torch.Generator().manual_seed(8))[0], first)


def test_labels_outside_num_classes_are_named(tmp_path):
    exp, _, labels = write_exp_dir(tmp_path)
    HuBERTDataSet(exp, "librispeech", "train", num_classes=100)
    top = max(int(lab.max()) for lab in labels)
    with pytest.raises(ValueError, match=rf"label_train.pt:\d+: label {top} is outside \[0, {top}\); --num-classes"):
        HuBERTDataSet(exp, "librispeech", "train", num_classes=top)


def test_pad_mode_zero_pads_and_reports_true_lengths():
    sizes = [900, 2000, 1500]
    batch = [(torch.full((1, n), 1.0), torch.arange(1, expected_num_labels(n, "hubert") + 1), n) for n in sizes]
    waveforms, labels, lengths = CollateFnHubert("hubert", pad=True)(batch)
    assert waveforms.shape == (3, 2000) and labels.shape == (3, expected_num_labels(2000, "hubert"))
    assert lengths.tolist() == sizes
    for row, n in enumerate(sizes):
        assert waveforms[row, :n].eq(1).all() and waveforms[row, n:].eq(0).all()
        k = expected_num_labels(n, "hubert")
        assert labels[row, :k].tolist() == list(range(1, k + 1)) and labels[row, k:].eq(0).all()


def test_aligner_pads_to_the_bucket_length():
    lengths = [32000, 120000, 141000, 250000]
    aligner = BucketizeBatchSampler(lengths, num_buckets=10, min_len=32000, max_len=250000,
                                    max_token_count=5_600_000).gen_bucket_boundary_fn()
    pickle.loads(pickle.dumps(aligner))
    collate = CollateFnHubert("hubert", pad=True, aligner=aligner)
    for sizes, width in [([32000, 40000], 53800), ([120000, 141000], 162801), ([250000], 250001), ([400], 31999)]:
        batch = [(torch.ones(1, n), torch.ones(expected_num_labels(n, "hubert"), dtype=torch.int64), n) for n in sizes]
        waveforms, labels, lengths = collate(batch)
        assert waveforms.shape == (len(sizes), width) and waveforms.dtype == torch.float32
        assert labels.shape == (len(sizes), (width - 400) // 320 + 1) and labels.dtype == torch.int64
        assert lengths.tolist() == sizes and lengths.dtype == torch.int64
        assert waveforms.sum().item() == sum(sizes)
        assert labels.sum().item() == sum(expected_num_labels(n, "hubert") for n in sizes)


def test_label_count_mismatch_is_an_error():
    n = 32000
    good = torch.zeros(expected_num_labels(n, "mfcc"), dtype=torch.int64)
    CollateFnHubert("mfcc")([(torch.zeros(1, n), good, n)])
    with pytest.raises(ValueError, match=r"batch item 1: 197 labels for 32000 samples, but feature type 'mfcc' "
                                         r"needs 198"):
        CollateFnHubert("mfcc")([(torch.zeros(1, n), good, n), (torch.zeros(1, n), good[1:], n)])
    with pytest.raises(ValueError, match=r"198 labels for 32000 samples, but feature type 'hubert' needs 99"):
        CollateFnHubert("hubert")([(torch.zeros(1, n), good, n)])
    with pytest.raises(ValueError, match="feature_type must be one of"):
        CollateFnHubert("fbank")


def test_npy_labels_give_the_same_items_and_checks(tmp_path):
    exp, _, labels = write_exp_dir(tmp_path)
    text = HuBERTDataSet(exp, "librispeech", "train", feature_type="mfcc", num_classes=100)
    write_npy(exp / "label", labels)
    (exp / "label" / "label_train.pt").unlink()
    ds = HuBERTDataSet(exp, "librispeech", "train", feature_type="mfcc", num_classes=100)
    assert isinstance(ds.labels, NpyLabels)
    for i in range(len(ds)):
        assert torch.equal(ds[i][1], text[i][1]) and torch.equal(ds[i][0], text[i][0])
    loader = DataLoader(ds, batch_size=None, num_workers=2)  # workers open the memory maps themselves
    assert [item[1].tolist() for item in loader] == [lab.tolist() for lab in labels]
    with pytest.raises(ValueError, match=r"label_train.npy:1: 198 labels, .* for feature type 'hubert'"):
        HuBERTDataSet(exp, "librispeech", "train", feature_type="hubert")
    with pytest.raises(ValueError, match=r"label_train.npy:\d+: label 9\d is outside \[0, 90\)"):
        HuBERTDataSet(exp, "librispeech", "train", num_classes=90)
