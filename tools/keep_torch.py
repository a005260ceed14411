"""Constraints that keep the installed torch when installing the requirements (Intel Gaudi's container, a
cluster's own build), with the torchaudio made for it:

    python tools/keep_torch.py > keep-torch.txt
    pip install -r requirements.txt -c keep-torch.txt

Reads installed metadata only: nothing of torch is imported (it may not load on a login node)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's packages
from utils.versions import installed, torchaudio_for  # noqa: E402


def main() -> int:
    torch = installed("torch")
    if torch is None:
        sys.exit("keep_torch.py: error: no torch installed here: install the torch for this machine first "
                 "(README, Install)")
    torchaudio = installed("torchaudio")
    print(f"torch=={torch}")
    print(f"torchaudio=={torchaudio}" if torchaudio else torchaudio_for(torch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
