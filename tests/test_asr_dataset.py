"""dataset/asr.py: transcribed LibriSpeech-layout folders, LibriLight-limited subsets, the CTC collate."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dataset import TranscribedAudio, collate_ctc, find_subset, librilight_folders, list_utterances
from tests.fixtures import make_transcribed_corpus
from utils.common_utils import BadAudioError
from utils.ctc import ids_to_text


def test_utterances_items_and_collate(tmp_path):
    root = make_transcribed_corpus(tmp_path / "c", n_utts=3)
    utterances = list_utterances([root])
    assert [u.utt_id for u in utterances] == ["7-70-0000", "7-70-0001", "7-70-0002"]
    assert all(u.num_samples == sf.info(u.path).frames for u in utterances)
    dataset = TranscribedAudio(utterances)
    waveform, tokens = dataset[1]
    assert waveform.shape == (utterances[1].num_samples,) and ids_to_text(tokens.tolist()) == utterances[1].transcript
    waveforms, labels, lengths, label_lengths = collate_ctc([dataset[0], dataset[1]])
    assert waveforms.shape == (2, int(dataset.lengths[:2].max())) and lengths.tolist() == dataset.lengths[:2].tolist()
    shorter = int(label_lengths.argmin())
    assert labels.shape == (2, int(label_lengths.max())) and (labels[shorter, label_lengths[shorter]:] == -1).all()
    short = int(lengths.argmin())
    assert torch.equal(waveforms[short, lengths[short]:], torch.zeros(int(lengths.max() - lengths[short])))


def test_bad_transcripts_and_audio_are_named(tmp_path):
    root = make_transcribed_corpus(tmp_path / "c", n_utts=3)
    trans = root / "7" / "70" / "7-70.trans.txt"
    lines = trans.read_text().splitlines()
    trans.write_text("\n".join(lines + ["7-70-0009 MISSING AUDIO"]) + "\n")
    sf.write(root / "7" / "70" / "7-70-0001.flac", np.zeros(16000, np.float32), 8000)
    with pytest.raises(BadAudioError, match=r"(?s)7-70-0001.flac: sample rate 8000.*"
                                            r"7-70-0009.flac: listed in 7-70.trans.txt but missing"):
        list_utterances([root])
    trans.write_text(lines[0] + "\n7-70-0002 HOW?\n")
    with pytest.raises(ValueError, match=r"7-70.trans.txt:2: characters '\?' are not in the CTC vocabulary"):
        list_utterances([root])
    with pytest.raises(FileNotFoundError, match="no \\*.trans.txt"):
        list_utterances([tmp_path / "c" / "nothing"])


def test_find_subset_in_torchaudio_and_dataset_itr1_layouts(tmp_path):
    (tmp_path / "a" / "LibriSpeech" / "dev-other").mkdir(parents=True)
    (tmp_path / "b" / "dev_extract" / "dev-other" / "LibriSpeech" / "dev-other").mkdir(parents=True)
    assert find_subset(tmp_path / "a", "dev-other") == tmp_path / "a" / "LibriSpeech" / "dev-other"
    assert find_subset(tmp_path / "b" / "dev_extract", "dev-other") == tmp_path / "b" / "dev_extract" / "dev-other"
    assert find_subset(tmp_path / "b", "dev-other").parts[-2:] == ("LibriSpeech", "dev-other")
    with pytest.raises(FileNotFoundError, match="no LibriSpeech subset 'test-clean'"):
        find_subset(tmp_path, "test-clean")


def test_librilight_subsets(tmp_path):
    base = tmp_path / "ft_extract" / "librispeech_finetuning" / "librispeech_finetuning"
    for folder in ["1h/0/clean", "1h/0/other", "1h/1/clean", "9h/clean", "9h/other"]:
        (base / folder).mkdir(parents=True)
    rel = {s: [f.relative_to(base).as_posix() for f in librilight_folders(tmp_path, s)] for s in ("10min", "1h", "10h")}
    assert rel == {"10min": ["1h/0"], "1h": ["1h/0", "1h/1"], "10h": ["1h/0", "1h/1", "9h"]}
    with pytest.raises(FileNotFoundError, match="no LibriLight-limited data"):
        librilight_folders(tmp_path / "ft_extract" / "elsewhere", "10h")


def test_a_flac_corrupt_in_its_middle_is_named_when_loaded(tmp_path):
    """Its header and tail are fine (the listing's check passes); decoding stops in the middle, naming the file."""
    corpus = make_transcribed_corpus(tmp_path, n_utts=2)
    utterances = list_utterances([corpus])
    path = Path(utterances[1].path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - len(data) // 10:middle + len(data) // 10] = b"\xff\x00" * (len(data) // 10)
    path.write_bytes(data)
    assert list_utterances([corpus])[1].path == str(path)  # the header and tail checks still pass
    dataset = TranscribedAudio(utterances)
    dataset[0]
    with pytest.raises(ValueError, match=f"{path}: cannot decode audio"):
        dataset[1]
