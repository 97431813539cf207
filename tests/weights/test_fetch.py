"""Fetching published weights, against a loopback HTTP server on 127.0.0.1 (never the internet): a full download,
a resumed one (Range), a server that ignores Range, a wrong hash, a dropped connection, a 404, a web page, a proxy,
the Google Drive manual steps, and `pretrained=True, download=True` end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import torch
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.errors import WeightsNotFoundError
from medtransfer.weights import fetch as fetch_mod
from medtransfer.weights.export import export_official
from medtransfer.weights.fetch import DownloadError, ManualDownloadError, fetch_file, manual_host
from medtransfer.zoo import registry
from medtransfer.zoo.pretrained import fetch_pretrained

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A loopback file server. ``files``: path -> bytes; ``ranges``: honour ``Range: bytes=N-`` (206);
    ``drop_after``: send that many body bytes of a full Content-Length, then close; ``html``: paths served as
    text/html; ``redirects``: path -> address answered with 302. ``requests`` records (path, Range header) of every request; as a proxy, the path is the full URL."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.drop_after: int | None = None
        self.html: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                moved = outer.redirects.get(urlsplit(self.path).path)
                if moved is not None:  # as GitHub release and Hugging Face addresses do, to their CDN
                    self.send_response(302)
                    self.send_header("Location", moved)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = outer.files.get(urlsplit(self.path).path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and outer.ranges:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                kind = "text/html" if urlsplit(self.path).path in outer.html else "application/octet-stream"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                rest = body[start:]
                if outer.drop_after is not None:
                    self.wfile.write(rest[: outer.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def server():
    s = Server()
    s.files["/w.pth"] = PAYLOAD
    yield s
    s.close()


def test_full_download_is_verified_and_installed_whole(server, tmp_path):
    target = tmp_path / "cache" / "w.pth"
    done = fetch_file(server.url("/w.pth"), target, sha256=DIGEST, progress=False)
    assert target.read_bytes() == PAYLOAD and not (tmp_path / "cache" / "w.pth.part").exists()
    assert (done.path, done.sha256, done.verified, done.reused, done.resumed_from, done.downloaded) == (
        target, DIGEST, True, False, 0, len(PAYLOAD))
    assert server.requests == [("/w.pth", None)]
    again = fetch_file(server.url("/w.pth"), target, sha256=DIGEST, progress=False)
    assert again.reused and again.verified and len(server.requests) == 1  # in the cache: no second request


def test_a_hash_prefix_as_torchvision_names_carry_is_checked(server, tmp_path):
    assert fetch_file(server.url("/w.pth"), tmp_path / "w.pth", sha256=DIGEST[:8].upper(), progress=False).verified
    with pytest.raises(ValueError, match="8 to 64 hexadecimal digits"):
        fetch_file(server.url("/w.pth"), tmp_path / "x.pth", sha256="abc", progress=False)


def test_a_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    target = tmp_path / "w.pth"
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD[:30000])
    done = fetch_file(server.url("/w.pth"), target, sha256=DIGEST, progress=False)
    assert server.requests == [("/w.pth", "bytes=30000-")]
    assert (done.resumed_from, done.downloaded) == (30000, len(PAYLOAD) - 30000)
    assert target.read_bytes() == PAYLOAD and not (tmp_path / "w.pth.part").exists()


def test_a_redirect_keeps_the_range_request(server, tmp_path):
    server.redirects["/releases/download/v1/w.pth"] = server.url("/w.pth")
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD[:1000])
    done = fetch_file(server.url("/releases/download/v1/w.pth"), tmp_path / "w.pth", sha256=DIGEST, progress=False)
    assert server.requests == [("/releases/download/v1/w.pth", "bytes=1000-"), ("/w.pth", "bytes=1000-")]
    assert done.resumed_from == 1000 and (tmp_path / "w.pth").read_bytes() == PAYLOAD


def test_a_part_another_process_is_writing_is_left_alone(server, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    part = tmp_path / "w.pth.part"
    part.write_bytes(PAYLOAD[:1000])
    with open(part, "ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match="another process is downloading this file"):
            fetch_file(server.url("/w.pth"), tmp_path / "w.pth", progress=False)
    assert part.read_bytes() == PAYLOAD[:1000] and not (tmp_path / "w.pth").exists()


def test_a_server_that_ignores_range_restarts_the_file(server, tmp_path):
    server.ranges = False
    (tmp_path / "w.pth.part").write_bytes(b"x" * 5000)  # whatever the .part holds is dropped, not prepended
    lines = []
    done = fetch_file(server.url("/w.pth"), tmp_path / "w.pth", sha256=DIGEST, progress=False, echo=lines.append)
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD and done.resumed_from == 0
    assert lines == [f"{server.url('/w.pth')}: the server does not resume downloads; starting again"]


def test_a_complete_part_answered_by_416_is_installed(server, tmp_path):
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD)
    done = fetch_file(server.url("/w.pth"), tmp_path / "w.pth", sha256=DIGEST, progress=False)
    assert server.requests == [("/w.pth", f"bytes={len(PAYLOAD)}-")] and done.downloaded == 0
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD


def test_a_wrong_hash_installs_nothing_and_removes_the_part(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url("/w.pth"), tmp_path / "w.pth", sha256=wrong, progress=False)
    msg = str(info.value)
    assert f"sha256 is {DIGEST}, expected {wrong}" in msg and "was removed" in msg
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_connection_keeps_the_part_and_the_next_call_resumes(server, tmp_path):
    target = tmp_path / "w.pth"
    server.drop_after = 40000
    with pytest.raises(DownloadError) as info:
        fetch_file(server.url("/w.pth"), target, sha256=DIGEST, progress=False)
    part = tmp_path / "w.pth.part"
    assert f"dropped after 40000 of {len(PAYLOAD)} bytes" in str(info.value)
    assert f"the partial file {part} is kept" in str(info.value)
    assert part.read_bytes() == PAYLOAD[:40000] and not target.exists()
    server.drop_after = None
    done = fetch_file(server.url("/w.pth"), target, sha256=DIGEST, progress=False)
    assert server.requests[-1] == ("/w.pth", "bytes=40000-") and done.resumed_from == 40000
    assert target.read_bytes() == PAYLOAD and not part.exists()


def test_a_404_is_a_clear_error_and_writes_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match=r"/gone\.pth: HTTP 404 Not Found; nothing was written"):
        fetch_file(server.url("/gone.pth"), tmp_path / "cache" / "w.pth", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_address_that_serves_a_web_page_writes_nothing(server, tmp_path):
    server.files["/page"] = b"<html>sign in</html>"
    server.html.add("/page")
    with pytest.raises(DownloadError, match="answers with a web page, not the file"):
        fetch_file(server.url("/page"), tmp_path / "w.pth", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_connection_names_the_proxy_variables(tmp_path):
    s = Server()
    url = s.url("/w.pth")
    s.close()  # nothing listens on that port any more
    with pytest.raises(DownloadError, match="cannot connect .*https_proxy, http_proxy, no_proxy"):
        fetch_file(url, tmp_path / "w.pth", progress=False)


def test_the_proxy_variables_are_honoured(server, tmp_path, monkeypatch):
    # the loopback server as the proxy: a proxied request carries the absolute URL of a host that does not exist
    monkeypatch.setenv("http_proxy", server.url(""))
    done = fetch_file("http://weights.invalid/w.pth", tmp_path / "w.pth", sha256=DIGEST, progress=False)
    assert server.requests == [("http://weights.invalid/w.pth", None)] and done.verified


def test_plain_progress_lines_every_tenth(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod, "CHUNK", 1024)
    lines = []
    fetch_file(server.url("/w.pth"), tmp_path / "w.pth", progress=True, echo=lines.append)  # stderr: no TTY here
    assert len(lines) == 10 and all(line.startswith("fetch w.pth: ") for line in lines)
    assert [line.split("(")[1].split(")")[0] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]
    assert "0.1 MB/0.1 MB (100%)" in lines[-1]


@pytest.mark.parametrize("url, kind", [
    ("https://drive.google.com/file/d/1jQc/view?usp=sharing", "a Google Drive page"),
    ("https://pan.baidu.com/s/1Qk86", "a Baidu Netdisk page"),
    ("https://cornell.box.com/s/bnyhq5", "a Box page"),
    ("https://www.dropbox.com/sh/87d24/AAC/InsDis.pth", "a Dropbox page"),
    ("https://www.dropbox.com/s/lh5k/Genesis_Chest_CT.pt?dl=1", None),
    ("https://github.com/o/r/releases/download/v1/w.pth", None),
    ("https://zenodo.org/record/5205234/files/chexpert.pth.tar?download=1", None),
    ("https://huggingface.co/o/r/resolve/main/model.pt", None),
])
def test_manual_hosts(url, kind):
    assert manual_host(url) == kind


def test_a_google_drive_file_gets_the_manual_steps_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path))
    cfg = mt.get_entry("pctnet").pretrained[0]
    assert "drive.google.com" in cfg.url
    with pytest.raises(ManualDownloadError) as info:
        fetch_pretrained(cfg)
    msg = str(info.value)
    assert "a Google Drive page" in msg and f"open {cfg.url}" in msg and "nothing was written" in msg
    assert f"put it at {tmp_path / 'weights' / cfg.file_name}" in msg
    with pytest.raises(ManualDownloadError):  # and the same through create_model
        mt.create_model("pctnet", pretrained=True, download=True)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(_app(), ["zoo", "fetch", "pctnet"])
    assert result.exit_code == 1 and "a Google Drive page" in result.output and list(tmp_path.iterdir()) == []


def _app():
    from medtransfer.cli import app

    return app


@pytest.fixture
def served_medicalnet(server, tmp_path, monkeypatch):
    """medicalnet_resnet10's first published file (random weights, official layout) served on the loopback, its
    PretrainedCfg pointing there with the file's true sha256."""
    torch.manual_seed(3)
    reference = mt.create_model("medicalnet_resnet10", task="features")
    path = export_official(reference.state_dict(), tmp_path / "src" / "resnet_10.pth", "medicalnet")
    body = path.read_bytes()
    entry = mt.get_entry("medicalnet_resnet10")
    cfg = dataclasses.replace(entry.pretrained[0], url=server.url("/resnet_10.pth"),
                              sha256=hashlib.sha256(body).hexdigest())
    server.files["/resnet_10.pth"] = body
    patched = dataclasses.replace(entry, pretrained=(cfg, *entry.pretrained[1:]))
    monkeypatch.setitem(registry._REGISTRY, entry.name, patched)
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "home"))
    return reference, cfg, body


def test_pretrained_true_never_downloads_unless_asked(served_medicalnet, server, tmp_path):
    _, cfg, _ = served_medicalnet
    with pytest.raises(WeightsNotFoundError) as info:
        mt.create_model("medicalnet_resnet10", task="features", pretrained=True)
    assert "never downloads unless asked" in str(info.value)
    assert "`medtransfer zoo fetch medicalnet_resnet10.3dseg8` (or pass download=True)" in str(info.value)
    assert server.requests == [] and not (tmp_path / "home").exists()
    with pytest.raises(ValueError, match="download=True fetches the published weights of pretrained=True"):
        mt.create_model("medicalnet_resnet10", task="features", pretrained="some.pth", download=True)


def test_create_model_with_download_fetches_into_the_cache_and_loads(served_medicalnet, server, tmp_path):
    reference, cfg, body = served_medicalnet
    model = mt.create_model("medicalnet_resnet10", task="features", pretrained=True, download=True)
    assert (tmp_path / "home" / "weights" / cfg.file_name).read_bytes() == body
    assert model.load_report.coverage == 1.0 and len(server.requests) == 1
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), reference.eval().forward_features(x))
    mt.create_model("medicalnet_resnet10", task="features", pretrained=True, download=True)
    assert len(server.requests) == 1  # the cached file is used


def test_zoo_fetch_command(served_medicalnet, server, tmp_path):
    _, cfg, body = served_medicalnet
    result = CliRunner().invoke(_app(), ["zoo", "fetch", "medicalnet_resnet10"])
    target = tmp_path / "home" / "weights" / cfg.file_name
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(target) and target.read_bytes() == body
    assert f"sha256 {cfg.sha256} (matches the zoo's record)" in result.output
    assert f"fetch {cfg.file_name}: " in result.output and "(100%)" in result.output  # no TTY: plain lines
    server.drop_after = 1000
    target.unlink()
    dropped = CliRunner().invoke(_app(), ["zoo", "fetch", "medicalnet_resnet10"])
    assert dropped.exit_code == 1 and "dropped after 1000 of" in dropped.output and "run the same command" in \
        dropped.output
    assert (target.parent / (cfg.file_name + ".part")).stat().st_size == 1000


def test_an_unrecorded_hash_is_reported_with_the_one_computed(served_medicalnet, tmp_path, monkeypatch, caplog):
    _, cfg, body = served_medicalnet
    unrecorded = dataclasses.replace(cfg, sha256=None)
    with caplog.at_level("WARNING", logger="medtransfer.zoo.pretrained"):
        done = fetch_pretrained(unrecorded, progress=False)
    assert not done.verified and done.sha256 == hashlib.sha256(body).hexdigest()
    assert f"sha256 not recorded in its PretrainedCfg, so the file is unverified; computed {done.sha256}" in caplog.text


def test_a_finetune_config_with_model_download_fetches_before_the_data_is_read(served_medicalnet, server, tmp_path):
    from medtransfer.errors import MedTransferError
    from medtransfer.train.config import load_config
    from medtransfer.train.finetune import check_weights

    _, cfg, body = served_medicalnet
    base = {"model": {"name": "medicalnet_resnet10", "task": "classification", "num_classes": 2}, "out": "x"}
    with pytest.raises(WeightsNotFoundError, match="never downloads unless asked"):
        check_weights(load_config({**base, "model": {**base["model"], "pretrained": True}}))
    assert server.requests == []
    check_weights(load_config({**base, "model": {**base["model"], "pretrained": True, "download": True}}))
    assert (tmp_path / "home" / "weights" / cfg.file_name).read_bytes() == body and len(server.requests) == 1
    with pytest.raises(MedTransferError, match="model.download: true fetches the published weights"):
        check_weights(load_config({**base, "model": {**base["model"], "pretrained": "file.pth", "download": True}}))
