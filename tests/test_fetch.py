"""Downloads: checksums, truncation, missing mirrors, unsafe archives; each must fail clearly and leave nothing."""

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from pipeline.data import DataError, fetch
from pipeline.data.fetch import DownloadError, Source
from tests.conftest import make_tar


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def payload(tmp_path):
    data = b"0123456789" * 1000
    src = tmp_path / "mirror" / "ds" / "file.bin"
    src.parent.mkdir(parents=True)
    src.write_bytes(data)
    return data, src


def test_fetch_verifies_then_skips_when_present(payload, tmp_path):
    data, src = payload
    dest = tmp_path / "raw" / "file.bin"
    fetch.fetch(dest, [Source(str(src))], sha256=sha(data))
    assert dest.read_bytes() == data
    src.unlink()  # a second call must not need any source
    fetch.fetch(dest, [Source(str(src))], sha256=sha(data))
    assert leftovers(dest.parent) == ["file.bin"]


def test_checksum_mismatch_names_both_digests_and_the_source_and_leaves_nothing(payload, tmp_path):
    data, src = payload
    dest = tmp_path / "raw" / "file.bin"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        fetch.fetch(dest, [Source(str(src))], sha256=wrong)
    message = str(err.value)
    assert f"expected sha256 {wrong}, got {sha(data)}" in message
    assert str(src) in message and "RNNLAB_DATA_MIRROR" in message
    assert leftovers(dest.parent) == []


def test_a_corrupt_mirror_copy_falls_back_to_the_next_source(payload, tmp_path):
    data, src = payload
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:-1] + b"X")
    dest = tmp_path / "raw" / "file.bin"
    fetch.fetch(dest, [Source(str(bad)), Source(str(src))], sha256=sha(data))
    assert dest.read_bytes() == data


class LyingHandler(http.server.BaseHTTPRequestHandler):
    """Serves /ok/<anything> whole, and /short/<anything> with half the promised bytes (a dropped connection)."""

    body = b"abcdefghij" * 500

    def do_GET(self):  # noqa: N802 (http.server's naming)
        login = self.headers.get("Authorization")
        if self.path.startswith(("/auth/", "/moved/")) and login != "Basic YWxpY2U6czMgY3JldA==":
            self.send_error(401)  # /auth/ and /moved/ want alice's password "s3 cret"
            return
        if self.path.startswith("/moved/"):  # to another host (a CDN, a signed URL): it must not get the login
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cdn/ds/file.bin")
            self.end_headers()
            return
        if self.path.startswith("/cdn/") and login:
            self.send_error(400, "the login leaked to another host")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        whole = self.path.startswith(("/ok/", "/auth/", "/cdn/"))
        self.wfile.write(self.body if whole else self.body[: len(self.body) // 2])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), LyingHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_mirror_and_truncated_transfer(server, tmp_path):
    body = LyingHandler.body
    dest = tmp_path / "raw" / "file.bin"
    source = fetch.mirror_source(f"{server}/ok", "ds", "file.bin")
    assert str(source) == f"{server}/ok/ds/file.bin"
    fetch.fetch(dest, [source], sha256=sha(body))
    assert dest.read_bytes() == body

    short = tmp_path / "raw" / "short.bin"
    with pytest.raises(DownloadError, match=r"truncated transfer: got 2500 of 5000 bytes"):
        fetch.fetch(short, [Source(f"{server}/short/ds/file.bin")], sha256=sha(body))
    assert leftovers(short.parent) == ["file.bin"]


def test_a_mirror_url_with_a_password_logs_in_by_basic_authentication(server, tmp_path):
    body, host = LyingHandler.body, server.removeprefix("http://")
    fetch.fetch(tmp_path / "a.bin", [Source(f"http://alice:s3%20cret@{host}/auth/ds/file.bin")], sha256=sha(body))
    assert (tmp_path / "a.bin").read_bytes() == body
    fetch.fetch(tmp_path / "c.bin", [Source(f"http://alice:s3%20cret@{host}/moved/ds/file.bin")], sha256=sha(body))
    assert (tmp_path / "c.bin").read_bytes() == body  # redirected to another host, without the login
    with pytest.raises(DownloadError, match="401") as err:
        fetch.fetch(tmp_path / "b.bin", [Source(f"http://alice:wrong@{host}/auth/ds/file.bin")], sha256=sha(body))
    assert "wrong" not in str(err.value)  # the password is never in the message


def test_unreachable_host_fails_fast_and_names_the_mirror_option(tmp_path):
    dest = tmp_path / "raw" / "x.bin"
    with pytest.raises(DownloadError) as err:
        fetch.fetch(dest, [Source("http://127.0.0.1:9/x.bin")], sha256="0" * 64, timeout=5)
    assert "http://127.0.0.1:9/x.bin" in str(err.value)
    assert "RNNLAB_DATA_MIRROR" in str(err.value) and "download.mirror" in str(err.value)
    assert leftovers(dest.parent) == []


def test_missing_mirror_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match=r"the data mirror .*nowhere does not exist.*RNNLAB_DATA_MIRROR"):
        fetch.mirror_source(str(tmp_path / "nowhere"), "ptb", "ptb.train.txt")
    assert fetch.mirror_source(None, "ptb", "ptb.train.txt") is None


def test_archive_with_a_parent_member_is_refused_and_leaves_nothing(tmp_path):
    archive = make_tar(tmp_path / "evil.tgz", {"data/good.txt": b"fine", "data/../../escape.txt": b"gotcha"})
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"refusing unsafe member 'data/../../escape.txt'"):
        fetch.safe_extract(archive, dest, keep=lambda name: name)
    assert leftovers(dest) == [] and not (tmp_path / "escape.txt").exists()


def test_safe_extract_selects_and_renames_members(tmp_path):
    archive = make_tar(tmp_path / "a.tgz", {"./x/data/a.txt": b"A", "./x/data/b.txt": b"B", "./x/other": b"-"})
    written = fetch.safe_extract(archive, tmp_path / "out", keep=lambda n: Path(n).name if "/data/" in n else None)
    assert sorted(p.name for p in written) == ["a.txt", "b.txt"]
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"A"


def test_a_corrupt_file_in_place_is_deleted_even_when_no_source_verifies(payload, tmp_path, caplog):
    data, src = payload
    dest = tmp_path / "raw" / "file.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"corrupt")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:-1] + b"X")
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch.fetch(dest, [Source(str(bad)), Source("http://127.0.0.1:9/file.bin")], sha256=sha(data), timeout=5)
    assert leftovers(dest.parent) == []  # missing, never corrupt: no later stage can read it
    assert f"{dest} fails verification (sha256 {sha(b'corrupt')}, expected {sha(data)})" in caplog.text


def test_a_corrupt_file_in_place_is_replaced_from_a_verified_source(payload, tmp_path, caplog):
    data, src = payload
    dest = tmp_path / "raw" / "file.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"corrupt")
    fetch.fetch(dest, [Source(str(src))], sha256=sha(data))
    assert dest.read_bytes() == data and leftovers(dest.parent) == ["file.bin"]
    assert f"{dest} fails verification (sha256 {sha(b'corrupt')}" in caplog.text


def test_a_file_in_place_failing_its_content_check_is_deleted(tmp_path, caplog):
    dest = tmp_path / "raw" / "file.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"not what the check wants")

    def check(path: Path) -> None:
        if path.read_bytes() != b"good":
            raise DownloadError("content digest mismatch: expected good, got bad")

    with pytest.raises(DownloadError, match="file.bin"):
        fetch.fetch(dest, [], check=check)
    assert leftovers(dest.parent) == []
    assert f"{dest} fails verification (content digest mismatch: expected good, got bad)" in caplog.text


def test_require_sha256_names_the_file_both_digests_and_the_fix(tmp_path):
    path = tmp_path / "ptb.train.txt"
    path.write_bytes(b"hand-edited")
    with pytest.raises(DataError) as err:
        fetch.require_sha256(path, "f" * 64, "ptb")
    assert str(err.value) == (
        f"raw file {path} is not verified: expected sha256 {'f' * 64}, got {sha(b'hand-edited')}. "
        "Fetch it again: `python -m pipeline.download data=ptb` (or `dvc repro download_ptb`)."
    )
    with pytest.raises(DataError, match=r"raw file .*missing\.txt is missing\. Fetch it again: `python -m pipe"):
        fetch.require_sha256(tmp_path / "missing.txt", "f" * 64, "ptb")
