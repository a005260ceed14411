"""dataset_itr1.py and utils/download.py against a real HTTP server on 127.0.0.1 that serves small
generated LibriSpeech-like .tar.gz archives and honours (or, on request, ignores) Range requests."""
import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

import dataset_itr1
from utils.download import ChecksumError, DownloadError, download_file, fetch

SUBSETS = ["train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean", "test-other"]
FLAC_FRAMES = 1600


class Handler(BaseHTTPRequestHandler):
    """Serves server.files[name]; records (path, Range header); supports 'bytes=N-' ranges."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        range_header = self.headers.get("Range")
        if range_header and server.honor_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.truncate_at is not None:  # announce everything, send a little, hang up
            body = body[: server.truncate_at]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.honor_range, httpd.truncate_at = {}, [], True, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/resources/12"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def flac_bytes() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.linspace(-0.5, 0.5, FLAC_FRAMES), 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_archive(subset: str, extra: list[tarfile.TarInfo] = ()) -> bytes:
    """A .tar.gz with LibriSpeech's member layout (README.TXT, <subset>/<spk>/<chapter>/...)."""
    files = {
        "LibriSpeech/README.TXT": b"tiny LibriSpeech\n",
        f"LibriSpeech/{subset}/19/198/19-198-0001.flac": flac_bytes(),
        f"LibriSpeech/{subset}/19/198/19-198.trans.txt": b"19-198-0001 HELLO\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def serve_subsets(server, tmp_path, subsets=SUBSETS, extra=()):
    """Put archives on the server; return a sha256sum-style checksums file for them."""
    lines = []
    for subset in subsets:
        data = make_archive(subset, extra)
        server.files[f"resources/12/{subset}.tar.gz"] = data
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {subset}.tar.gz")
    checksums = tmp_path / "SHA256SUMS"
    checksums.write_text("\n".join(lines) + "\n")
    return checksums


def run_main(server, checksums, download_dir, split, *flags):
    return dataset_itr1.main([
        "--download_dir", str(download_dir), "--librispeech_split", split,
        "--base-url", server.url, "--checksums", str(checksums), *flags,
    ])


def test_main_downloads_and_extracts_upstream_layout(server, tmp_path, capsys):
    checksums = serve_subsets(server, tmp_path)
    download_dir = tmp_path / "not" / "yet" / "there"
    extract_loc = run_main(server, checksums, download_dir, "960")

    assert extract_loc == download_dir / "960_extract"
    subsets = ["train-clean-100", "train-clean-360", "train-other-500"]
    assert [path for path, _ in server.requests] == [f"/resources/12/{s}.tar.gz" for s in subsets]
    for subset in subsets:
        tarball = download_dir / "downloaded_raw" / f"{subset}.tar.gz"
        assert tarball.read_bytes() == server.files[f"resources/12/{subset}.tar.gz"]
        root = extract_loc / subset
        assert (root / dataset_itr1.MARKER).exists()
        audio, rate = sf.read(root / "LibriSpeech" / subset / "19" / "198" / "19-198-0001.flac")
        assert (len(audio), rate) == (FLAC_FRAMES, 16000)
        assert (root / "LibriSpeech" / "README.TXT").exists()
    leftovers = [p.name for p in download_dir.rglob("*") if p.name.endswith((".part", ".partial"))]
    assert leftovers == []
    assert f"--root-dir {extract_loc}" in capsys.readouterr().out


def test_resume_sends_range_and_completes(server, tmp_path):
    data = make_archive("dev-clean")
    server.files["resources/12/dev-clean.tar.gz"] = data
    dest = tmp_path / "dev-clean.tar.gz"
    (tmp_path / "dev-clean.tar.gz.part").write_bytes(data[:100])

    download_file(f"{server.url}/dev-clean.tar.gz", dest, hashlib.sha256(data).hexdigest())

    assert server.requests == [("/resources/12/dev-clean.tar.gz", "bytes=100-")]
    assert dest.read_bytes() == data
    assert not (tmp_path / "dev-clean.tar.gz.part").exists()


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    data = make_archive("dev-clean")
    server.files["resources/12/dev-clean.tar.gz"] = data
    server.honor_range = False
    dest = tmp_path / "dev-clean.tar.gz"
    (tmp_path / "dev-clean.tar.gz.part").write_bytes(data[:100])

    download_file(f"{server.url}/dev-clean.tar.gz", dest, hashlib.sha256(data).hexdigest())

    assert server.requests == [("/resources/12/dev-clean.tar.gz", "bytes=100-")]
    assert dest.read_bytes() == data  # not the first 100 bytes twice


def test_broken_transfer_keeps_part_then_resumes(server, tmp_path):
    data = make_archive("dev-clean")
    server.files["resources/12/dev-clean.tar.gz"] = data
    server.truncate_at = 300
    dest = tmp_path / "dev-clean.tar.gz"
    url = f"{server.url}/dev-clean.tar.gz"
    with pytest.raises(DownloadError, match="re-run to resume"):
        download_file(url, dest, hashlib.sha256(data).hexdigest())
    assert not dest.exists()
    assert (tmp_path / "dev-clean.tar.gz.part").read_bytes() == data[:300]

    server.truncate_at = None
    download_file(url, dest, hashlib.sha256(data).hexdigest())
    assert server.requests[-1] == ("/resources/12/dev-clean.tar.gz", "bytes=300-")
    assert dest.read_bytes() == data


def test_complete_part_answered_416_is_verified_and_kept(server, tmp_path):
    data = make_archive("dev-clean")
    server.files["resources/12/dev-clean.tar.gz"] = data
    dest = tmp_path / "dev-clean.tar.gz"
    (tmp_path / "dev-clean.tar.gz.part").write_bytes(data)
    download_file(f"{server.url}/dev-clean.tar.gz", dest, hashlib.sha256(data).hexdigest())
    assert server.requests == [("/resources/12/dev-clean.tar.gz", f"bytes={len(data)}-")]
    assert dest.read_bytes() == data


def test_corrupt_part_is_deleted_and_fetched_again(server, tmp_path):
    data = make_archive("dev-clean")
    server.files["resources/12/dev-clean.tar.gz"] = data
    dest = tmp_path / "dev-clean.tar.gz"
    (tmp_path / "dev-clean.tar.gz.part").write_bytes(b"\0" * 100)  # wrong prefix: resume cannot fix it

    fetch(f"{server.url}/dev-clean.tar.gz", dest, hashlib.sha256(data).hexdigest())

    assert [r for _, r in server.requests] == ["bytes=100-", None]
    assert dest.read_bytes() == data


def test_checksum_mismatch_stops_before_extraction(server, tmp_path):
    checksums = serve_subsets(server, tmp_path, ["train-clean-100"])
    expected = checksums.read_text().split()[0]
    served = make_archive("train-clean-100") + b"tampered"
    server.files["resources/12/train-clean-100.tar.gz"] = served
    download_dir = tmp_path / "data"

    with pytest.raises(SystemExit) as error:
        run_main(server, checksums, download_dir, "100", "--cleanup")

    message = str(error.value)
    assert "train-clean-100.tar.gz" in message and expected in message
    assert hashlib.sha256(served).hexdigest() in message
    assert len(server.requests) == 2  # fetched again once, then gave up
    assert list((download_dir / "downloaded_raw").iterdir()) == []  # no final name, no .part
    assert list((download_dir / "100_extract").iterdir()) == []
    with pytest.raises(ChecksumError):
        download_file(f"{server.url}/train-clean-100.tar.gz", tmp_path / "x.tar.gz", expected)


def _member(name, type=tarfile.REGTYPE, linkname="", size=0):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type, linkname, size
    return info


# The shape of the mid-2025 tarfile hole (CVE-2025-4517): a chain of symbolic links, then a file written through
# its end. The real one needs paths past PATH_MAX to get by the "data" filter; links are refused whatever they say.
SYMLINK_CHAIN = [_member("LibriSpeech/a", tarfile.SYMTYPE, "."), _member("LibriSpeech/b", tarfile.SYMTYPE, "a/a/a"),
                 _member("LibriSpeech/c", tarfile.SYMTYPE, "b/../../../../.."),
                 _member("LibriSpeech/c/evil.txt", size=4)]
CRAFTED = {
    "dotdot": ([_member("../evil.txt", size=4)], "'../evil.txt' has a name that does not stay inside"),
    "absolute": ([_member("/tmp/evil.txt", size=4)], "'/tmp/evil.txt' has a name that does not stay inside"),
    "symlink": ([_member("LibriSpeech/link", tarfile.SYMTYPE, "../../../../evil.txt")],
                "'LibriSpeech/link' is a symbolic link"),
    "symlink-chain": (SYMLINK_CHAIN, "'LibriSpeech/a' is a symbolic link"),
    "hardlink": ([_member("LibriSpeech/hard", tarfile.LNKTYPE, "LibriSpeech/README.TXT")],
                 "'LibriSpeech/hard' is a hard link"),
    "device": ([_member("LibriSpeech/null", tarfile.CHRTYPE)], "'LibriSpeech/null' is a character device"),
    "fifo": ([_member("LibriSpeech/pipe", tarfile.FIFOTYPE)], "'LibriSpeech/pipe' is a fifo"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_member_is_refused_by_name_and_nothing_is_written(server, tmp_path, case):
    extra, message = CRAFTED[case]
    checksums = serve_subsets(server, tmp_path, ["train-clean-100"], extra=extra)
    download_dir = tmp_path / "data"

    with pytest.raises(SystemExit, match=re.escape(f"refusing unsafe member: member {message}")):
        run_main(server, checksums, download_dir, "100", "--cleanup")

    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))
    assert not (tmp_path.parent / "evil.txt").exists()
    assert list((download_dir / "100_extract").iterdir()) == []  # neither target nor temp folder
    assert (download_dir / "downloaded_raw" / "train-clean-100.tar.gz").exists()  # kept: not extracted


def test_extraction_writes_plain_files_with_default_modes(tmp_path):
    """Folders ('./' included) and files come out; the archive's setuid bit and owner are not applied."""
    info = _member("LibriSpeech/run.sh", size=3)
    info.mode = 0o4777
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(_member("./", tarfile.DIRTYPE))
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())

    dataset_itr1.extract_tar(tmp_path / "a.tar.gz", tmp_path / "out" / "a")

    extracted = tmp_path / "out" / "a" / "LibriSpeech" / "run.sh"
    assert extracted.read_bytes() == b"abc" and not extracted.stat().st_mode & 0o4000


def test_rerun_skips_finished_work_and_redoes_half_extraction(server, tmp_path, capsys):
    checksums = serve_subsets(server, tmp_path)
    download_dir = tmp_path / "data"
    run_main(server, checksums, download_dir, "dev")
    assert len(server.requests) == 2

    run_main(server, checksums, download_dir, "dev")
    assert len(server.requests) == 2
    assert "already extracted" in capsys.readouterr().out

    target = download_dir / "dev_extract" / "dev-clean"
    (target / dataset_itr1.MARKER).unlink()  # as if killed mid-extraction
    (target / "stray.flac").write_bytes(b"half")
    run_main(server, checksums, download_dir, "dev")
    assert len(server.requests) == 2  # tarball was already verified: no download
    assert (target / dataset_itr1.MARKER).exists()
    assert not (target / "stray.flac").exists()
    assert (target / "LibriSpeech" / "dev-clean" / "19" / "198" / "19-198-0001.flac").exists()
    assert "only files whose path below --root-dir contains 'train'" in capsys.readouterr().out


def test_split_300_is_an_alias_of_360(server, tmp_path, capsys):
    checksums = serve_subsets(server, tmp_path, ["train-clean-360"])
    extract_loc = run_main(server, checksums, tmp_path / "data", "300")
    assert extract_loc == tmp_path / "data" / "360_extract"
    assert (extract_loc / "train-clean-360" / "LibriSpeech" / "train-clean-360" / "19" / "198").is_dir()
    assert "warning: --librispeech_split 300 is taken as 360" in capsys.readouterr().out


def test_cleanup_deletes_tarballs_after_extraction(server, tmp_path):
    checksums = serve_subsets(server, tmp_path)
    download_dir = tmp_path / "data"
    run_main(server, checksums, download_dir, "test", "--cleanup")

    assert not (download_dir / "downloaded_raw").exists()
    for subset in ["test-clean", "test-other"]:
        assert (download_dir / "test_extract" / subset / "LibriSpeech" / subset / "19" / "198").is_dir()
    run_main(server, checksums, download_dir, "test", "--cleanup")
    assert len(server.requests) == 2  # extraction is done, so the deleted tarballs are not fetched again


def test_bad_checksums_file_and_http_404_give_clear_errors(server, tmp_path):
    bad = tmp_path / "SHA256SUMS"
    bad.write_text("not-a-hash  train-clean-100.tar.gz\n")
    with pytest.raises(SystemExit, match=r"SHA256SUMS:1: expected"):
        run_main(server, bad, tmp_path / "data", "100")

    good = serve_subsets(server, tmp_path, ["train-clean-100"])
    server.files.clear()
    with pytest.raises(SystemExit, match=r"train-clean-100.tar.gz: HTTP 404"):
        run_main(server, good, tmp_path / "data", "100")


def make_librilight_archive() -> bytes:
    """librispeech_finetuning.tgz's layout: 1h/<0-5>/{clean,other}/<spk>/<chapter>/..., 9h/{clean,other}/..."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i, folder in enumerate(["1h/0/clean", "1h/1/other", "9h/clean"]):
            files = {f"librispeech_finetuning/{folder}/19/19{i}/19-19{i}-0001.flac": flac_bytes(),
                     f"librispeech_finetuning/{folder}/19/19{i}/19-19{i}.trans.txt": f"19-19{i}-0001 HELLO\n".encode()}
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_librilight_limited_is_fetched_verified_and_found_by_finetuning(server, tmp_path, capsys):
    from dataset import librilight_folders, list_utterances

    data = make_librilight_archive()
    server.files["resources/12/librispeech_finetuning.tgz"] = data
    checksums = tmp_path / "SHA256SUMS"
    checksums.write_text(f"{hashlib.sha256(data).hexdigest()}  librispeech_finetuning.tgz\n")
    extract_loc = run_main(server, checksums, tmp_path / "data", "librilight")

    assert server.requests == [("/resources/12/librispeech_finetuning.tgz", None)]
    assert extract_loc == tmp_path / "data" / "librilight_extract"
    assert (extract_loc / "librispeech_finetuning" / dataset_itr1.MARKER).exists()
    assert "finetune.py --dataset-path" in capsys.readouterr().out
    for subset, count in (("10min", 1), ("1h", 2), ("10h", 3)):
        assert len(list_utterances(librilight_folders(tmp_path / "data", subset))) == count


def test_librilight_source_and_checksum_are_torchaudios():
    """The published SHA-256 of librispeech_finetuning.tgz, as torchaudio's LibriLightLimited checks it."""
    from torchaudio.datasets import librilight_limited

    assert dataset_itr1.SHA256["librispeech_finetuning.tgz"] == librilight_limited._CHECKSUM
    assert f"{dataset_itr1.SOURCES['librispeech_finetuning.tgz']}/librispeech_finetuning.tgz" == librilight_limited._URL
