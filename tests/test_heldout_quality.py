"""tools/heldout_quality.py: k-means labels of unseen audio scored against the demo alignments."""
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from tools.heldout_quality import heldout_quality, main
from utils.common_utils import list_audio
from utils.feature_utils import load_audio, mfcc_extractor

DEV = Path(__file__).resolve().parents[1] / "demo_data" / "LibriSpeech" / "dev-clean"
ALIGNMENTS = DEV.parents[1] / "alignments" / "dev-clean.tsv"


def fit(tmp_path, k):
    """A k-means model in preprocess.py's layout, fitted on MFCCs of the dev speakers themselves."""
    extractor = mfcc_extractor()
    feats = torch.cat([extractor.extract(load_audio(DEV / f)) for f in list_audio(DEV)]).numpy()
    (tmp_path / "km_model").mkdir(parents=True)
    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(feats)
    np.save(tmp_path / "km_model" / "model.npy", km.cluster_centers_)
    return tmp_path


def test_scores_every_heldout_utterance(tmp_path):
    quality = heldout_quality(fit(tmp_path, 20), DEV, [ALIGNMENTS], mfcc_extractor())
    assert quality.utterances == len(list_audio(DEV)) == 6
    assert quality.label_rate == 100 and quality.num_clusters == 20
    assert 0.2 < quality.pnmi < 1


def test_one_cluster_carries_no_information(tmp_path):
    assert heldout_quality(fit(tmp_path, 1), DEV, [ALIGNMENTS], mfcc_extractor()).pnmi == pytest.approx(0, abs=1e-9)


def test_cli_and_dimension_mismatch(tmp_path, capsys):
    data = fit(tmp_path, 5)
    quality = main(["--data-dir", str(data), "--audio-dir", str(DEV), "--alignments", str(ALIGNMENTS)])
    assert f"PNMI {quality.pnmi:.3f}" in capsys.readouterr().out
    np.save(data / "km_model" / "model.npy", torch.randn(2, 7).numpy())
    with pytest.raises(SystemExit, match="7-dim centres but the features \\(mfcc\\) are 39-dim"):
        main(["--data-dir", str(data), "--audio-dir", str(DEV), "--alignments", str(ALIGNMENTS)])
