"""Safe downloads: every file comes from a list of sources (a mirror first, then the canonical host), lands in a
temporary file, and is renamed into place only once its checksum matches. Nothing half-written is ever left
where a later stage could read it, and neither is a file already in place that fails verification: it is deleted
(after a warning naming its digest and the expected one) before any source is tried, so a failed download leaves
the file missing, never corrupt. Deleted rather than quarantined: the raw folders are DVC outputs, so a kept copy
would become part of the output, and a corrupt download is no one's work: the sources still hold the truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.data import DataError
from pipeline.redaction import redact

log = logging.getLogger(__name__)

MIRROR_HINT = (
    "If this machine cannot reach the dataset hosts, point rnnlab at a mirror laid out as <dataset>/<file>: "
    "set RNNLAB_DATA_MIRROR=/path/or/url (or pass download.mirror=... on the command line)."
)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched or verified; the message lists each source tried and what went wrong."""

    def __init__(self, message: str, failures: list[str] | None = None):
        super().__init__(message)
        self.failures = failures if failures is not None else [message]


def give_up(what: str, failures: list[str]) -> DownloadError:
    """The error for a file no source could supply: every attempt, then how to use a mirror."""
    tried = "\n".join(f"  - {f}" for f in failures) or "  (no source configured)"
    return DownloadError(f"could not get a verified {what}; tried:\n{tried}\n{MIRROR_HINT}", failures)


@dataclass(frozen=True)
class Source:
    """Where a file can come from: a URL (http, https, file) or a local path."""

    location: str

    @property
    def is_url(self) -> bool:
        return "://" in self.location

    def __str__(self) -> str:
        return redact(self.location)  # a mirror's password never reaches a message


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download_hint(source: str) -> str:
    """How to get verified raw files of ``source`` again: the download stage deletes and refetches bad ones."""
    return f"Fetch it again: `python -m pipeline.download data={source}` (or `dvc repro download_{source}`)."


def require_sha256(path: Path, sha256: str, source: str) -> None:
    """Raise DataError unless ``path`` exists with this sha256: a later stage must not build from a raw file that
    is missing or differs from the verified bytes."""
    if not path.exists():
        raise DataError(f"raw file {path} is missing. {download_hint(source)}")
    actual = sha256_file(path)
    if actual != sha256:
        raise DataError(
            f"raw file {path} is not verified: expected sha256 {sha256}, got {actual}. {download_hint(source)}"
        )


def discard_corrupt(path: Path, problem: str) -> None:
    """Delete a file at its final place that fails verification, so no later stage can read it; say why."""
    log.warning("%s fails verification (%s): deleting it so no later stage reads it", path, problem)
    path.unlink(missing_ok=True)


def verify_present(path: Path, sha256: str | None = None, check: Callable[[Path], None] | None = None) -> bool:
    """True when ``path`` exists and verifies (by ``sha256`` if given, else by ``check``); a file that exists but
    fails is deleted with a warning naming its digest and the expected one. False when missing or deleted."""
    if not path.exists() or not (sha256 or check):
        return False
    if sha256:
        actual = sha256_file(path)
        if actual == sha256:
            return True
        discard_corrupt(path, f"sha256 {actual}, expected {sha256}")
        return False
    try:
        check(path)
        return True
    except (DownloadError, tarfile.TarError) as err:
        discard_corrupt(path, str(err))
        return False


def mirror_source(mirror: str | None, dataset: str, filename: str) -> Source | None:
    """The mirror's copy of ``<dataset>/<filename>``, or None without a mirror.

    A local mirror folder that does not exist is a configuration mistake, reported at once rather than skipped.
    """
    if not mirror:
        return None
    if "://" in mirror:
        return Source(f"{mirror.rstrip('/')}/{dataset}/{filename}")
    root = Path(mirror).expanduser()
    if not root.is_dir():
        raise DownloadError(
            f"the data mirror {root} does not exist or is not a folder. Fix RNNLAB_DATA_MIRROR (or download.mirror) "
            "to name a folder laid out as <dataset>/<file>, or unset it to use the canonical hosts."
        )
    return Source(str(root / dataset / filename))


AGENT = {"User-Agent": "rnnlab"}


def _open_url(url: str, timeout: float) -> Any:
    """GET ``url``. A mirror's ``user:password@`` (which urllib would take for part of the host name) becomes HTTP
    basic authentication for that host only: a redirect elsewhere (a CDN, a signed storage URL) does not get it."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.urlopen(urllib.request.Request(url, headers=AGENT), timeout=timeout)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    logins = urllib.request.HTTPPasswordMgrWithPriorAuth()
    user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
    logins.add_password(None, bare, user, password, is_authenticated=True)  # sent with the first request
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(logins))
    return opener.open(urllib.request.Request(bare, headers=AGENT), timeout=timeout)


@contextlib.contextmanager
def _open_source(source: Source, timeout: float) -> Iterator[tuple[object, int | None]]:
    """A readable binary stream and its size (None when unknown)."""
    if source.is_url:
        with _open_url(source.location, timeout) as response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length else None
    else:
        path = Path(source.location)
        with open(path, "rb") as fh:
            yield fh, path.stat().st_size


def _copy_to(source: Source, dest: Path, timeout: float, desc: str) -> None:
    """Stream ``source`` into ``dest`` with a progress bar; a short read is an error (a truncated transfer)."""
    with _open_source(source, timeout) as (stream, size), open(dest, "wb") as out:
        with tqdm(total=size, unit="B", unit_scale=True, desc=desc, mininterval=1.0, leave=False) as bar:
            written = 0
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        if size is not None and written != size:
            raise DownloadError(f"truncated transfer: got {written} of {size} bytes")


def fetch(
    dest: Path,
    sources: list[Source],
    sha256: str | None = None,
    timeout: float = 30.0,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Put a verified copy of a file at ``dest`` from the first source that yields one.

    ``sha256`` verifies the bytes; ``check`` may verify content instead (it raises DownloadError). A file already
    at ``dest`` that verifies is kept and nothing is downloaded; one that fails is deleted first, so a failed
    download never leaves a corrupt file where later stages read.
    """
    if verify_present(dest, sha256, check):
        log.info("%s: present and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for source in sources:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _copy_to(source, tmp, timeout, desc=dest.name)
            if sha256:
                actual = sha256_file(tmp)
                if actual != sha256:
                    raise DownloadError(f"checksum mismatch: expected sha256 {sha256}, got {actual}")
            if check:
                check(tmp)
            os.replace(tmp, dest)
            log.info("%s: verified from %s", dest, source)
            return dest
        except (OSError, urllib.error.URLError, DownloadError, tarfile.TarError) as err:
            failures.append(f"{source}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise give_up(dest.name, failures)


def safe_extract(archive: Path, dest: Path, keep: Callable[[str], str | None]) -> list[Path]:
    """Extract the members ``keep`` maps to a relative output name (None skips them) into ``dest``.

    Members are extracted with tarfile's ``data`` filter, which refuses absolute paths, ``..`` and links that
    leave the folder; a refused member fails the whole extraction and leaves ``dest`` without partial files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    written: list[tuple[Path, Path]] = []
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                name = keep(member.name)
                if name is None or not member.isfile():
                    continue
                member.name = name
                try:
                    tar.extract(member, staging, filter="data")
                except tarfile.FilterError as err:
                    raise DownloadError(f"{archive.name}: refusing unsafe member {name!r}: {err}") from err
                written.append((staging / name, dest / name))
        for src, target in written:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        return [target for _, target in written]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
