"""Resumable HTTP download with SHA-256 verification (standard library only).

A file is streamed to `<dest>.part`, resumed with an HTTP Range request when that exists, verified,
and only then renamed to `<dest>`: a file under its final name has always passed its checksum.
"""
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm import tqdm

CHUNK_SIZE = 1 << 20


class DownloadError(RuntimeError):
    """The server could not be reached, refused the request, or the transfer broke off."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the published SHA-256."""


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, with a progress bar (archives are tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"sha256 {Path(path).name}", leave=False,
    ) as bar:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ChecksumError naming the file, expected and actual hash if they differ."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(f"{path}: SHA-256 mismatch: expected {expected.lower()}, got {actual}")


def _content_range(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """(first byte, total size) from 'bytes 100-999/1000' or 'bytes */1000'; None where unknown."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _part_is_complete(error: urllib.error.HTTPError, offset: int) -> bool:
    """A 416 reply to a Range request means the .part already holds every byte, if sizes agree."""
    return error.code == 416 and offset > 0 and _content_range(error.headers.get("Content-Range"))[1] == offset


def download_file(url: str, dest: Path, sha256: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Download url to dest, resuming `<dest>.part`; verify sha256 (if given) before the rename.

    A server that ignores Range (answers 200) restarts the file from scratch. On a checksum mismatch
    the .part is deleted (so the next try starts clean) and ChecksumError is raised. A transfer that
    breaks off keeps the .part and raises DownloadError; re-running resumes it.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    total = offset
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            if getattr(response, "status", None) == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    raise DownloadError(f"{url}: asked for bytes from {offset}, server sent from {start}")
            else:
                if offset:
                    print(f"{url}: server ignored the Range request; restarting {part.name} from scratch")
                offset = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
            with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
            ) as bar:
                while chunk := response.read(CHUNK_SIZE):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if not _part_is_complete(e, offset):
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(f"{url}: download broke off ({e}); re-run to resume {part}") from e

    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"{url}: got {size} of {total} bytes; re-run to resume {part}")
    if sha256 is not None:
        try:
            verify_sha256(part, sha256)
        except ChecksumError:
            part.unlink()
            raise
    os.replace(part, dest)
    return dest


def fetch(url: str, dest: Path, sha256: str) -> Path:
    """Make dest a verified copy of url: keep a good existing file, else download, re-fetching once
    if the bytes are corrupt. A second mismatch raises ChecksumError."""
    dest = Path(dest)
    if dest.exists():
        try:
            verify_sha256(dest, sha256)
            print(f"{dest} exists and matches its SHA-256, so skipping download")
            return dest
        except ChecksumError as e:
            print(f"{e}; deleting it and downloading again")
            dest.unlink()
    try:
        return download_file(url, dest, sha256)
    except ChecksumError as e:
        print(f"{e}; downloading it again once")
    return download_file(url, dest, sha256)
