"""Convert a k-means model of an earlier version of this recipe to the file this version reads.

Earlier versions (and upstream) saved ``km_model/model.pt``, a joblib pickle of sklearn's MiniBatchKMeans; loading
a pickle runs whatever code it holds, so preprocess.py and tools/ now read only ``km_model/model.npy``, the
(K, D) centres, without pickle. This command unpickles ``model.pt`` once and writes its centres there:

    python tools/convert_kmeans.py exp/data/mfcc/km_model

Run it only on a model.pt you made or trust. ``model.done`` stays valid, so preprocess.py does not fit again (it
labels again: the labels are keyed by the model file's hash).
"""
import argparse
import sys
from pathlib import Path

import joblib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from utils.common_utils import atomic_write  # noqa: E402
from utils.kmeans import LEGACY_MODEL, MODEL, check_centers, read_centers  # noqa: E402


def convert(km_dir) -> Path:
    """Write ``km_dir/model.npy`` from the pickled ``km_dir/model.pt`` (unpickled: trusted files only)."""
    km_dir = Path(km_dir)
    legacy, out = km_dir / LEGACY_MODEL, km_dir / MODEL
    if not legacy.is_file():
        raise FileNotFoundError(f"{legacy} not found: nothing to convert")
    try:
        km = joblib.load(legacy)
    except Exception as e:  # unpickling can raise anything
        raise ValueError(f"{legacy}: cannot be unpickled ({type(e).__name__}: {e})") from e
    centers = check_centers(getattr(km, "cluster_centers_", None), legacy)
    with atomic_write(out) as f:
        np.save(f, centers, allow_pickle=False)
    return out


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("km_dir", type=Path, help="the km_model folder holding the earlier version's model.pt")
    args = parser.parse_args(argv)
    try:
        out = convert(args.km_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"convert_kmeans.py: error: {e}")
    print(f"Wrote {out} ({read_centers(out).shape[0]} centres); {args.km_dir / LEGACY_MODEL} is no longer read and "
          "may be deleted")
    return out


if __name__ == "__main__":
    main()
