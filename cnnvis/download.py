"""Verified downloads and verified cached files.

:func:`download` fetches the first working http(s) URL into a ``.part`` file (resumable with HTTP
Range, bounded retries), checks size and checksum, and only then renames it into place: a failed
or unverified download never becomes a file that is used. At least one checksum (sha256 or sha1)
is required.

:func:`verify_cached` checks a file before it is used: the full hash once, then a small record of
size, modification time and hashes under ``<records>/``; later uses compare size and mtime with the
record and hash again only when they changed. Files cnnvis derives itself (built models, converted
Caffe models) are recorded when written (:func:`record_file`) and used only while they match their
record (:func:`matches_record`).

This module knows URLs, files and checksums only; which model lives where is :mod:`cnnvis.registry`.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import CnnvisError
from .manifest import file_hash, write_json

USER_AGENT = "cnnvis-fetch/1"
SCHEMES = ("http", "https")
_MAX_ATTEMPTS = 100  # hard bound even when every attempt makes some progress
# Errors worth retrying: the connection broke or timed out, or the server had a passing problem.
_RETRIABLE = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError,
              socket.timeout, TimeoutError, http.client.HTTPException)


def _naming(value, param: str, label: str | None):
    """How an error names ``value``: as ``label value`` or, without a label, as the parameter
    ``param=value``; and the params to list in the CnnvisError."""
    return (f"{label} {value}", ()) if label else (f"{param}={value}", (param,))


def check_url(url: str, param: str = "url", label: str | None = None) -> str:
    """``url`` if it is an http(s) URL with a host; else a one-line CnnvisError naming the
    parameter ``param`` (or, given one, ``label``)."""
    named, params = _naming(url, param, label)
    try:
        parts = urllib.parse.urlsplit(str(url))
    except ValueError as exc:
        raise CnnvisError(f"{named}: not a URL ({exc})", params=params) from None
    if parts.scheme.lower() not in SCHEMES or not parts.netloc:
        raise CnnvisError(f"{named}: only http:// and https:// URLs are downloaded", params=params)
    return url


def check_digest(value: str | None, algo: str, param: str | None = None) -> str | None:
    """A hex digest in lower case (None stays None); a malformed one is a one-line CnnvisError
    naming the parameter ``param`` (default: ``algo``)."""
    if value is None:
        return None
    n = {"sha256": 64, "sha1": 40}[algo]
    value = str(value).strip().lower()
    if len(value) != n or any(c not in "0123456789abcdef" for c in value):
        named, params = _naming(value, param or algo, None)
        raise CnnvisError(f"{named}: expected {n} hex digits ({algo})", params=params)
    return value


def download(urls, dest, sha256: str | None = None, sha1: str | None = None, size: int | None = None,
             progress: bool = True, retries: int = 3, timeout: float = 30.0, backoff: float = 1.0,
             label: str | None = None, part=None, records=None) -> Path:
    """Download the first URL that works into ``dest``: resumable ``part`` file (default
    ``<dest>.part``; HTTP Range), up to ``retries`` retries per URL without progress, checksum and
    size verification, atomic rename. Only http(s) URLs (redirects included); a checksum is
    required. A checksum mismatch deletes the download; a broken transfer keeps the ``.part`` for
    a later resume (outside ``dest``'s folder when ``part`` says so). With ``records``, the verified
    file's record is written there (see :func:`verify_cached`). Failures are one-line CnnvisErrors.
    """
    if isinstance(urls, str):
        urls = [urls]
    dest = Path(dest)
    label = label or dest.name
    for url in urls:
        check_url(url, label=f"{label}: URL")
    if not (sha256 or sha1):
        raise CnnvisError(f"{label}: no sha256 or sha1 to verify the download with; pass sha256=<64 hex digits>",
                          params="sha256")
    part = Path(part) if part is not None else dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            _download_one(url, part, size, progress, retries, timeout, backoff, label)
        except _DownloadFailed as exc:
            errors.append(f"{url}: {exc}")
            continue
        _verify_download(part, sha256, sha1, size, label=label)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
        if records is not None:
            _write_record(records, dest, {"sha256": sha256, "sha1": sha1})
        return dest
    raise CnnvisError(f"cannot download {label}: {'; '.join(errors)} (offline? the file can also be placed at {dest})")


def verify_cached(path, sha256: str | None = None, sha1: str | None = None, size: int | None = None,
                  label: str | None = None, records=None) -> Path:
    """Check a present file against its expected size and checksums before it is used.

    The hashes are computed once and recorded (size, mtime, hashes) in ``records``; while the
    file's size and mtime equal the record's, the recorded hashes are compared instead of hashing
    again. A mismatch is a one-line CnnvisError (the file is left for the user to inspect).
    """
    path = Path(path)
    label = label or path.name
    stat = path.stat()
    if size is not None and stat.st_size != size:
        raise CnnvisError(f"{label}: {path} failed verification (size {stat.st_size} bytes, expected {size}); "
                          "fetch again with force=True", params="force")
    wanted = {algo: want.lower() for algo, want in (("sha256", sha256), ("sha1", sha1)) if want}
    if not wanted:
        return path
    record = _read_record(records, path) if records is not None else None
    fresh = (record is not None and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
             and all(record.get(algo) for algo in wanted))
    got = {algo: record[algo] for algo in wanted} if fresh else {algo: file_hash(path, algo) for algo in wanted}
    problems = [f"{algo} {got[algo]}, expected {want}" for algo, want in wanted.items() if got[algo] != want]
    if problems:
        raise CnnvisError(f"{label}: {path} failed verification ({'; '.join(problems)}); fetch again with force=True",
                          params="force")
    if records is not None and not fresh:
        _write_record(records, path, got)
    return path


def record_file(path, records) -> None:
    """Record a file cnnvis just wrote itself (size, mtime, sha256), for :func:`matches_record`."""
    _write_record(records, Path(path), {"sha256": file_hash(path, "sha256")})


def matches_record(path, records) -> bool:
    """Whether ``path`` is still the file its record describes: same size and mtime, or the same
    sha256 (then the record is refreshed). False without a record."""
    path = Path(path)
    record = _read_record(records, path)
    if record is None or not record.get("sha256"):
        return False
    stat = path.stat()
    if record.get("size") != stat.st_size:
        return False
    if record.get("mtime_ns") == stat.st_mtime_ns:
        return True
    if file_hash(path, "sha256") != record["sha256"]:
        return False
    _write_record(records, path, {"sha256": record["sha256"]})
    return True


def _record_path(records, path: Path) -> Path:
    key = hashlib.sha256(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:24]
    return Path(records) / f"{key}.json"


def _read_record(records, path: Path):
    try:
        data = json.loads(_record_path(records, path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("path") != str(Path(path).resolve()):
        return None
    return data


def _write_record(records, path: Path, hashes: dict) -> None:
    stat = Path(path).stat()
    record = {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record.update({algo: value for algo, value in hashes.items() if value})
    try:
        write_json(_record_path(records, path), record)
    except (OSError, CnnvisError):
        pass  # a record only saves time; without one the file is hashed again next time


class _DownloadFailed(Exception):
    pass


class _SizeMismatch(Exception):
    pass


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow ftp://)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            newurl = urllib.parse.urljoin(req.full_url, target)
            if urllib.parse.urlsplit(newurl).scheme.lower() not in SCHEMES:
                raise _DownloadFailed(f"redirected to {newurl}, which is not an http(s) URL")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects())


def _download_one(url, part: Path, size, progress, retries, timeout, backoff, label):
    failures = 0
    last = None
    attempts = 0
    for attempts in range(1, _MAX_ATTEMPTS + 1):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have == size:
            return
        if size is not None and have > size:
            part.unlink()
            have = 0
        got = 0
        try:
            got = _transfer(url, part, have, size, progress, timeout, label)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                # Range not satisfiable: what we have is either the whole file or garbage.
                if size is None or have == size:
                    return
                part.unlink()
                last = "server refused to resume; restarting"
            elif exc.code in (408, 425, 429, 500, 502, 503, 504):
                last = f"HTTP {exc.code} {exc.reason}"
            else:
                raise _DownloadFailed(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, socket.gaierror):
                raise _DownloadFailed(f"cannot resolve the host ({reason.strerror or reason})") from None
            last = getattr(reason, "strerror", None) or str(reason)
        except _RETRIABLE as exc:
            last = f"connection broke ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
        except _SizeMismatch as exc:
            raise _DownloadFailed(str(exc)) from None
        got = max(got, (part.stat().st_size if part.exists() else 0) - have)
        failures = 0 if got > 0 else failures + 1
        if failures > retries:
            break
        time.sleep(min(backoff * (2 ** max(failures - 1, 0)), 30.0))
    raise _DownloadFailed(f"{last} (gave up after {attempts} attempts)")


def _transfer(url, part: Path, have: int, size, progress, timeout, label) -> int:
    """One HTTP request appending to ``part`` from byte ``have``; returns bytes received."""
    from tqdm import tqdm

    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    received = 0
    with _OPENER.open(request, timeout=timeout) as resp:
        status = getattr(resp, "status", 200)
        if have and status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != have:
                raise http.client.HTTPException(f"server resumed at byte {start}, not {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # a plain 200: the server sends the whole file again
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        if size is not None and total is not None and total != size:
            raise _SizeMismatch(f"server sends {total} bytes, expected {size}")
        with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                            unit_divisor=1024, desc=label, disable=not progress,
                                            file=sys.stderr, leave=False) as bar:
            while True:
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and have + received < total:
        # Servers without chunked framing may just close early: treat as a broken connection.
        raise http.client.IncompleteRead(b"", total - have - received)
    return received


def _content_range_start(value) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _verify_download(path: Path, sha256, sha1, size, label: str):
    """Check a finished download; a mismatch deletes it (one-line CnnvisError)."""
    problems = []
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        problems.append(f"size {actual_size} bytes, expected {size}")
    else:
        for algo, want in (("sha256", sha256), ("sha1", sha1)):
            if want:
                got = file_hash(path, algo)
                if got != want.lower():
                    problems.append(f"{algo} {got}, expected {want.lower()}")
    if problems:
        path.unlink()
        raise CnnvisError(f"{label}: download failed verification ({'; '.join(problems)}); the file was deleted")

