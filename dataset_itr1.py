"""Download and extract LibriSpeech from OpenSLR (step 0 of the HuBERT recipe), and the LibriLight-limited
fine-tuning set (librispeech_finetuning.tgz, for finetune.py).

Flags and layout follow the Habana recipe's dataset_itr1.py:
    <download_dir>/downloaded_raw/<archive>.tar.gz
    <download_dir>/<split>_extract/<archive name>/LibriSpeech/<archive name>/<spk>/<chapter>/*.flac
and the `<split>_extract` folder is what preprocess.py takes as --root-dir. On top of that every
archive is checked against its published SHA-256, downloads resume, extraction cannot write outside
its folder, and an interrupted run can simply be run again.

Example:
    python dataset_itr1.py --download_dir /data/hubert/itr1_data --librispeech_split 960 --cleanup
    # fine-tuning data: LibriLight-limited (10 min / 1 h / 10 h) and LibriSpeech dev-other for validation
    python dataset_itr1.py --download_dir /data/hubert/ft --librispeech_split librilight
    python dataset_itr1.py --download_dir /data/hubert/ft --librispeech_split dev
"""
import argparse
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from utils.download import DownloadError, fetch

BASE_URL = "https://www.openslr.org/resources/12"
# Libri-Light's own host for its fine-tuning subsets (the URL torchaudio's LibriLightLimited downloads).
LIBRILIGHT_URL = "https://dl.fbaipublicfiles.com/librilight/data"

SPLITS = {
    "100": ["train-clean-100.tar.gz"],
    "360": ["train-clean-360.tar.gz"],
    "500": ["train-other-500.tar.gz"],
    "960": ["train-clean-100.tar.gz", "train-clean-360.tar.gz", "train-other-500.tar.gz"],
    "dev": ["dev-other.tar.gz", "dev-clean.tar.gz"],
    "test": ["test-clean.tar.gz", "test-other.tar.gz"],
    "librilight": ["librispeech_finetuning.tgz"],
}
SOURCES = {"librispeech_finetuning.tgz": LIBRILIGHT_URL}  # the others come from BASE_URL
# The upstream README and argparse say "300" but the upstream table only knows "360" (KeyError).
SPLIT_ALIASES = {"300": "360"}

# Published SHA-256 of the archives (the values torchaudio's LIBRISPEECH and LibriLightLimited datasets check).
SHA256 = {
    "librispeech_finetuning.tgz": "5d1efdc777b548194d7e09ba89126e2188026df9fd57aa57eb14408d2b2342af",
    "dev-clean.tar.gz": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other.tar.gz": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean.tar.gz": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other.tar.gz": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100.tar.gz": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360.tar.gz": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500.tar.gz": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}

# Written last into a finished extraction: a folder without it is half done and is redone.
MARKER = ".extracted"


class ArchiveError(RuntimeError):
    """An archive is unreadable or has a member that would land outside its target folder."""


def read_checksums(path: Path) -> dict[str, str]:
    """Parse sha256sum output ('<sha256>  <name>' or '<sha256> *<name>'), keyed by file name."""
    checksums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"\s*([0-9a-fA-F]{64}) [ *](.+?)\s*", line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected '<64 hex digit sha256>  <archive name>', got {line!r}")
        checksums[Path(match.group(2)).name] = match.group(1).lower()
    return checksums


def _stream_members(tar: tarfile.TarFile, raw, bar: tqdm):
    """Yield members as their headers are read (one pass over the gzip), advancing the bar by
    compressed bytes consumed and showing the member count."""
    for count, member in enumerate(tar, start=1):
        yield member
        bar.update(raw.tell() - bar.n)
        bar.set_postfix_str(f"{count} files", refresh=False)


def member_path(member: tarfile.TarInfo, root: Path) -> Path:
    """Where a member goes under root; ArchiveError unless it is a regular file or a folder whose name stays
    inside root (no absolute name, no '..'). Links, devices and fifos are refused: LibriSpeech has none, and
    without them nothing extracted can redirect a later write, on any Python (tarfile's "data" filter let a chain
    of symbolic links write outside before the mid-2025 releases)."""
    if not (member.isreg() or member.isdir()):
        kind = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}.get(member.type, f"type {member.type!r}")
        raise ArchiveError(f"member {member.name!r} is a {kind}; only regular files and folders are extracted")
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise ArchiveError(f"member {member.name!r} has a name that does not stay inside the archive's folder "
                           "(absolute or with '..')")
    return root.joinpath(*name.parts)


def extract_members(tar: tarfile.TarFile, members, root: Path) -> int:
    """Write each member (checked by member_path) under root, a new empty folder, so no path in it is a link;
    files get default permissions (the archive's modes and owners are not applied). Returns the count."""
    count = 0
    for count, member in enumerate(members, start=1):
        path = member_path(member, root)
        if member.isdir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return count


def extract_tar(archive: Path, target: Path) -> None:
    """Extract a .tar.gz into target, safely and atomically.

    Only regular files and folders with names inside target are extracted (member_path); any other member
    stops the extraction with an error naming it. Extraction happens in a temp folder beside target's parent,
    which is renamed (with MARKER inside) only when every member is out; a target without MARKER is redone.
    """
    archive, target = Path(archive), Path(target)
    if (target / MARKER).exists():
        print(f"{target} is already extracted, so skipping")
        return
    # Outside target's folder, which preprocess.py globs for *.flac; the same file system, so the rename
    # at the end is atomic.
    tmp = target.parent.with_name(f".{target.parent.name}.partial") / target.name
    for stale in (tmp, target):
        if stale.exists():
            print(f"Removing unfinished extraction {stale}")
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:gz") as tar, tqdm(
            total=os.path.getsize(archive), unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"extract {archive.name}",
        ) as bar:
            count = extract_members(tar, _stream_members(tar, raw, bar), tmp.resolve())
    except ArchiveError as e:
        shutil.rmtree(tmp)
        raise ArchiveError(f"{archive}: refusing unsafe member: {e}") from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        shutil.rmtree(tmp)
        raise ArchiveError(f"{archive}: cannot read archive: {e}") from e
    except OSError as e:  # a member whose folder is a file of the archive, a full disk: named by e
        shutil.rmtree(tmp)
        raise ArchiveError(f"{archive}: cannot extract: {e}") from e
    (tmp / MARKER).write_text(f"{archive.name}\n{count} members\n")
    os.replace(tmp, target)
    if not any(tmp.parent.iterdir()):
        tmp.parent.rmdir()
    print(f"Extracted {count} members of {archive.name} into {target}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the layout in the description as written."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--download_dir", type=Path, required=True,
                        help="Base folder; gets downloaded_raw/ and <split>_extract/ (created if missing).")
    parser.add_argument("--librispeech_split", default="960", choices=[*SPLITS, *SPLIT_ALIASES],
                        help="Which LibriSpeech part to fetch: 100/360/500 hours of training data, all 960, "
                             "dev or test, or librilight: the LibriLight-limited fine-tuning set (10 min / 1 h / "
                             "10 h, 0.6 GB). '300' (upstream README) is taken as 360.")
    parser.add_argument("--cleanup", action="store_true",
                        help="Delete each tarball once it has been extracted.")
    parser.add_argument("--base-url", default=None,
                        help=f"Where the archives are served (a mirror); default {BASE_URL}, and {LIBRILIGHT_URL} for "
                             "librispeech_finetuning.tgz.")
    parser.add_argument("--checksums", type=Path, default=None,
                        help="sha256sum-style file ('<sha256>  <archive name>' per line) that overrides or adds "
                             "checksums, e.g. for a mirror with its own archives.")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    split = args.librispeech_split
    if split in SPLIT_ALIASES:
        print(f"warning: --librispeech_split {split} is taken as {SPLIT_ALIASES[split]} (train-clean-360)")
        split = SPLIT_ALIASES[split]
    if split not in ("960", "librilight"):
        print(f"Note: fetching split {split} only; the HuBERT recipe pre-trains on all 960 hours")
    checksums = dict(SHA256)
    if args.checksums is not None:
        try:
            checksums.update(read_checksums(args.checksums))
        except (OSError, ValueError) as e:
            raise SystemExit(f"dataset_itr1.py: error: {e}") from e

    raw_dir = args.download_dir / "downloaded_raw"
    extract_loc = args.download_dir / f"{split}_extract"
    raw_dir.mkdir(parents=True, exist_ok=True)
    extract_loc.mkdir(exist_ok=True)
    try:
        for name in SPLITS[split]:
            archive = raw_dir / name
            target = extract_loc / name.split(".")[0]
            if (target / MARKER).exists():
                print(f"{target} is already extracted, so skipping download and extraction")
            else:
                base = args.base_url or SOURCES.get(name, BASE_URL)
                fetch(f"{base.rstrip('/')}/{name}", archive, checksums[name])
                extract_tar(archive, target)
            if args.cleanup and archive.exists():
                print(f"Deleting {archive}")
                archive.unlink()
    except (DownloadError, ArchiveError) as e:
        raise SystemExit(f"dataset_itr1.py: error: {e}") from e
    if args.cleanup and not any(raw_dir.iterdir()):
        raw_dir.rmdir()

    print(f"Extracted data here: {extract_loc}")
    if split == "librilight":
        print(f"Next: python finetune.py --dataset-path {args.download_dir} --subset 10h ... (with "
              f"--librispeech_split dev fetched into the same --download_dir for validation on dev-other)")
    elif split in ("dev", "test"):
        print("Note: preprocess.py lists only files whose path below --root-dir contains 'train', so it would skip "
              f"these {split} files; they are for evaluation (evaluate.py) and fine-tuning validation, not pre-training.")
    else:
        print(f"Next: python preprocess.py --root-dir {extract_loc} ...")
    return extract_loc


if __name__ == "__main__":
    main()
