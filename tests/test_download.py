"""cnnvis.download: verified, resumable http(s) downloads and verified cached files, against a
loopback HTTP server (127.0.0.1 only)."""
import hashlib
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cnnvis import download
from cnnvis.errors import CnnvisError

PAYLOAD = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
PAYLOAD_SHA1 = hashlib.sha1(PAYLOAD).hexdigest()
FAST = dict(progress=False, retries=2, timeout=5.0, backoff=0.01)


# ---------------------------------------------------------------------- loopback HTTP server

class LoopbackServer:
    """Serves PAYLOAD on 127.0.0.1 under paths that choose a behaviour:
    /good, /corrupt (one byte flipped), /drop (first response closes half-way),
    /norange (ignores Range, always 200), /short (announces and sends fewer bytes each time),
    /to-good and /to-file (302 to /files/good or to file:///etc/passwd); anything else is 404. Records (path, Range header) of every request."""

    def __init__(self):
        self.requests = []
        self.served = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                count = outer.served[self.path] = outer.served.get(self.path, 0) + 1
                name = self.path.rsplit("/", 1)[-1]
                if name in ("to-file", "to-good"):  # redirects: to a file:// URL, or to /good
                    self.send_response(302)
                    self.send_header("Location", "file:///etc/passwd" if name == "to-file" else "/files/good")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name not in ("good", "corrupt", "drop", "norange", "short"):
                    self.send_error(404)
                    return
                data = PAYLOAD
                if name == "corrupt":
                    data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
                start = 0
                if rng and name != "norange":
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name == "drop" and count == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if name == "short":
                    body = body[:100]
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name):
        return f"{self.base}/files/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    srv = LoopbackServer()
    yield srv
    srv.close()


def dead_url():
    # A port nobody listens on: bind, read the port, close.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/files/good"


# ---------------------------------------------------------------------- downloads

def test_download_good_file(server, tmp_path):
    dest = tmp_path / "cache" / "model.bin"
    out = download.download(server.url("good"), dest, sha256=PAYLOAD_SHA256, size=len(PAYLOAD), **FAST)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not list(dest.parent.glob("*.part"))
    assert server.requests == [("/files/good", None)]


def test_download_corrupted_file_is_deleted(server, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(CnnvisError) as info:
        download.download(server.url("corrupt"), dest, sha256=PAYLOAD_SHA256, **FAST)
    message = str(info.value)
    assert "sha256" in message and PAYLOAD_SHA256 in message and "deleted" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part is left


def test_download_resumes_after_dropped_connection(server, tmp_path):
    dest = tmp_path / "model.bin"
    download.download(server.url("drop"), dest, sha256=PAYLOAD_SHA256, size=len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    half = len(PAYLOAD) // 2
    assert server.requests == [("/files/drop", None), ("/files/drop", f"bytes={half}-")]


def test_download_resumes_a_part_file_from_an_earlier_run(server, tmp_path):
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(PAYLOAD[:1234])
    download.download(server.url("good"), dest, sha1=PAYLOAD_SHA1, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/files/good", "bytes=1234-")]


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(b"stale bytes from elsewhere")
    download.download(server.url("norange"), dest, sha256=PAYLOAD_SHA256, **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_download_server_down_is_one_line(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(CnnvisError) as info:
        download.download(dead_url(), tmp_path / "m.bin", sha256=PAYLOAD_SHA256, **FAST)
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    assert "cannot download m.bin" in message and "refused" in message.lower() and "\n" not in message
    assert "gave up after 3 attempts" in message  # retries=2: three tries without progress
    assert not (tmp_path / "m.bin").exists()


def test_download_falls_back_to_mirror(server, tmp_path):
    dest = tmp_path / "m.bin"
    download.download([server.url("missing"), server.url("good")], dest, sha256=PAYLOAD_SHA256, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/files/missing", "/files/good"]  # 404 is not retried


def test_download_wrong_size_and_truncating_server(server, tmp_path):
    with pytest.raises(CnnvisError, match="expected 5"):
        download.download(server.url("good"), tmp_path / "a.bin", sha256=PAYLOAD_SHA256, size=5, **FAST)
    # Each response stops after 100 bytes: every resume makes progress, so only the hard bound
    # on attempts ends it.
    with pytest.raises(CnnvisError, match=f"gave up after {download._MAX_ATTEMPTS} attempts"):
        download.download(server.url("short"), tmp_path / "b.bin", sha256=PAYLOAD_SHA256, **FAST)
    assert server.served["/files/short"] == download._MAX_ATTEMPTS
    assert (tmp_path / "b.bin.part").stat().st_size == 100 * download._MAX_ATTEMPTS  # kept for a later resume


def test_only_http_urls_are_downloaded(server, tmp_path):
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x", "/etc/passwd", "http://", "gopher://h/x"):
        with pytest.raises(CnnvisError, match=r"only http:// and https:// URLs are downloaded$"):
            download.download(url, tmp_path / "m.bin", sha256=PAYLOAD_SHA256, **FAST)
    with pytest.raises(CnnvisError, match=r"redirected to file:///etc/passwd, which is not an http\(s\) URL"):
        download.download(server.url("to-file"), tmp_path / "m.bin", sha256=PAYLOAD_SHA256, **FAST)
    assert os.listdir(tmp_path) == []
    download.download(server.url("to-good"), tmp_path / "m.bin", sha256=PAYLOAD_SHA256, **FAST)
    assert (tmp_path / "m.bin").read_bytes() == PAYLOAD


def test_a_download_without_a_checksum_is_refused_before_any_request(server, tmp_path):
    with pytest.raises(CnnvisError, match=r"m.bin: no sha256 or sha1 to verify the download with; pass sha256=<64 hex digits>$"):
        download.download(server.url("good"), tmp_path / "m.bin", size=len(PAYLOAD), **FAST)
    assert server.requests == [] and os.listdir(tmp_path) == []


def test_a_part_elsewhere_keeps_the_destination_folder_clean(server, tmp_path):
    cache, partial = tmp_path / "models", tmp_path / "partial"
    with pytest.raises(CnnvisError, match="gave up"):
        download.download(server.url("short"), cache / "m.bin", sha256=PAYLOAD_SHA256, part=partial / "m.bin.part",
                          **FAST)
    assert not cache.exists()  # nothing unverified where models are loaded from
    assert (partial / "m.bin.part").stat().st_size > 0
    with pytest.raises(CnnvisError, match="failed verification"):
        download.download(server.url("corrupt"), cache / "m.bin", sha256=PAYLOAD_SHA256, part=partial / "n.bin.part",
                          **FAST)
    assert not cache.exists() and os.listdir(partial) == ["m.bin.part"]  # the failed one is deleted


def test_verify_cached_hashes_once_then_checks_size_and_mtime(tmp_path, monkeypatch):
    path, records = tmp_path / "m.bin", tmp_path / "records"
    path.write_bytes(PAYLOAD)
    hashed = []
    real = download.file_hash
    monkeypatch.setattr(download, "file_hash", lambda p, algo: hashed.append(algo) or real(p, algo))
    for _ in range(3):
        assert download.verify_cached(path, sha256=PAYLOAD_SHA256, size=len(PAYLOAD), records=records) == path
    assert hashed == ["sha256"]  # hashed once; the record answers the other two
    record = next(records.iterdir())
    assert '"sha256": "%s"' % PAYLOAD_SHA256 in record.read_text()
    # Same size, new content and mtime: hashed again and refused, in one line.
    tampered = bytearray(PAYLOAD)
    tampered[5] ^= 1
    path.write_bytes(bytes(tampered))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(CnnvisError) as info:
        download.verify_cached(path, sha256=PAYLOAD_SHA256, size=len(PAYLOAD), records=records, label="m")
    message = str(info.value)
    assert message.startswith(f"m: {path} failed verification (sha256 ") and message.endswith("fetch again with force=True")
    assert hashed == ["sha256", "sha256"]
    with pytest.raises(CnnvisError, match=r"size 3 bytes, expected 300000"):
        path.write_bytes(b"abc")
        download.verify_cached(path, sha256=PAYLOAD_SHA256, size=len(PAYLOAD), records=records)
    # sha1 asked for later is computed then, not taken from a record that lacks it
    path.write_bytes(PAYLOAD)
    download.verify_cached(path, sha1=hashlib.sha1(PAYLOAD).hexdigest(), records=records)
    assert hashed[-1] == "sha1"


def test_check_digest_and_url_messages():
    assert download.check_digest(PAYLOAD_SHA256.upper(), "sha256") == PAYLOAD_SHA256
    with pytest.raises(CnnvisError, match=r"^sha256=abc: expected 64 hex digits \(sha256\)$") as err:
        download.check_digest("abc", "sha256")
    assert err.value.params == ("sha256",)
    with pytest.raises(CnnvisError, match=r"^mirror=ab: expected 40 hex digits \(sha1\)$"):
        download.check_digest("AB", "sha1", param="mirror")
    assert download.check_url("https://example.org/m.onnx") == "https://example.org/m.onnx"
    with pytest.raises(CnnvisError, match=r"^url=ftp://h/m: only http:// and https:// URLs are downloaded$") as err:
        download.check_url("ftp://h/m")
    assert err.value.params == ("url",)
    with pytest.raises(CnnvisError, match=r"^m.bin: URL ftp://h/m: only http") as err:
        download.check_url("ftp://h/m", label="m.bin: URL")
    assert err.value.params == ()


def test_records_of_files_cnnvis_wrote(tmp_path):
    path, records = tmp_path / "built.onnx", tmp_path / "records"
    path.write_bytes(PAYLOAD)
    assert not download.matches_record(path, records)  # never recorded: not trusted
    download.record_file(path, records)
    assert download.matches_record(path, records)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes: hashed, still fine
    assert download.matches_record(path, records)
    data = bytearray(PAYLOAD)
    data[7] ^= 1
    path.write_bytes(bytes(data))
    assert not download.matches_record(path, records)
