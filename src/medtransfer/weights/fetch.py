"""Download one weight file on request, with the standard library only (``urllib``).

:func:`fetch_file` writes into ``TARGET.part`` beside the target and renames it onto ``TARGET`` (through
:func:`~medtransfer.weights.io.atomic_write`) only once the file is complete and, when a hash is known, its sha256
matches; a file at ``TARGET`` is therefore always whole. What happens on the way:

* a ``.part`` left by an earlier attempt is resumed with an HTTP ``Range`` request; a server that answers with the
  whole file (200) restarts it, one that answers 416 had sent everything already (or the ``.part`` is stale and is
  started again);
* a connection that drops (fewer bytes than ``Content-Length``, a reset, a timeout) raises :class:`DownloadError`
  and keeps the ``.part``, so the next call resumes it;
* a wrong sha256 raises :class:`DownloadError` naming both hashes and **removes** the ``.part``: a complete file
  of the wrong content cannot be resumed into the right one;
* an HTTP error (404, 403, ...) or an address that answers with a web page (``text/html``) raises before anything
  is written;
* proxies come from the environment (``http_proxy``, ``https_proxy``, ``no_proxy``), as ``urllib``'s default
  opener reads them with :func:`urllib.request.getproxies`;
* progress: a rich bar when stderr is a terminal, else a plain line every 10 percent (at most every 30 s apart).

Addresses that are web pages rather than files (Google Drive, Baidu Netdisk, Weiyun, Box, Dropbox folders, a
questionnaire) are named by :func:`manual_host`; callers print the manual steps for those instead of fetching.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

from ..errors import MedTransferError, WeightsNotFoundError
from .io import atomic_write

CHUNK = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not for the whole file
PLAIN_INTERVAL_S = 30.0  # plain progress: a line per tenth of the file, and at least this often
USER_AGENT = "medtransfer (urllib)"

# hosts whose addresses are pages a person clicks through (sign-in, quota pages, captchas), not files
_PAGE_HOSTS = {
    "drive.google.com": "a Google Drive page",
    "docs.google.com": "a Google Drive page",
    "pan.baidu.com": "a Baidu Netdisk page",
    "share.weiyun.com": "a Tencent Weiyun page",
    "wjx.top": "a questionnaire (wjx.top) that leads to the file",
    "box.com": "a Box page",
}


class DownloadError(MedTransferError):
    """A download that failed or gave the wrong file; the message says whether a resumable ``.part`` is kept."""


class ManualDownloadError(WeightsNotFoundError):
    """A published file that only a person can download (a Google Drive or Baidu page): the message holds the
    steps and the cache path."""


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_file` did: ``sha256`` of the file at ``path``; ``verified``: it matched the expected hash
    (False when none was given); ``reused``: the file was there already; ``resumed_from``: bytes of an earlier
    ``.part`` kept; ``downloaded``: bytes received by this call."""

    path: Path
    sha256: str
    verified: bool
    reused: bool = False
    resumed_from: int = 0
    downloaded: int = 0


def manual_host(url: str) -> Optional[str]:
    """What kind of web page ``url`` is when a person must download from it (e.g. ``'a Google Drive page'``); None
    for a direct link to the file (GitHub releases, Zenodo, Hugging Face ``resolve/``, plain HTTP servers)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    for page_host, kind in _PAGE_HOSTS.items():
        if host == page_host or host.endswith("." + page_host):
            return kind
    if host == "dropbox.com" or host.endswith(".dropbox.com"):
        # a shared link serves the file itself only with dl=1 (or raw=1)
        query = parse_qs(parts.query)
        if query.get("dl") != ["1"] and query.get("raw") != ["1"]:
            return "a Dropbox page"
    if parts.scheme not in ("http", "https"):
        return f"not a web address ({url!r})"
    return None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_expected(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", value):
        raise ValueError(f"sha256 must be 8 to 64 hexadecimal digits (a digest or the prefix a file name carries), "
                         f"got {sha256!r}")
    return value


def _matches(expected: Optional[str], digest: str) -> bool:
    return expected is not None and digest.startswith(expected)


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class _Meter:
    """Download progress: a rich bar on a terminal, else plain lines through ``echo`` at each tenth of the file (and
    at least every ``PLAIN_INTERVAL_S``), the last one when the file is complete."""

    def __init__(self, label: str, total: Optional[int], done: int, enabled: bool,
                 echo: Callable[[str], None]) -> None:
        self.label, self.total, self.done, self.echo = label, total, done, echo
        self.bar = None
        self.plain = enabled and not sys.stderr.isatty()
        self.t0 = self.t_line = time.perf_counter()
        self.start_done = self.shown = done
        self.tenth = (done * 10 // total) + 1 if total else None  # the next tenth to report
        if enabled and not self.plain:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=done)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.plain:
            now = time.perf_counter()
            due = self.tenth is not None and self.done * 10 >= self.tenth * self.total
            if due or now - self.t_line >= PLAIN_INTERVAL_S:
                self._line(now)

    def finish(self) -> None:
        if self.plain and self.shown != self.done:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        self.t_line, self.shown = now, self.done
        if self.tenth is not None:
            self.tenth = self.done * 10 // self.total + 1
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        of = f"/{_size(self.total)} ({self.done / self.total:.0%})" if self.total else ""
        self.echo(f"{self.label}: {_size(self.done)}{of}, {rate / 1e6:.1f} MB/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    # build_opener's ProxyHandler takes http_proxy/https_proxy/no_proxy from urllib.request.getproxies()
    opener = urllib.request.build_opener()
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def fetch_file(url: str, target: str | os.PathLike, *, sha256: Optional[str] = None, progress: bool = True,
               echo: Optional[Callable[[str], None]] = None, timeout: float = TIMEOUT_S) -> Fetched:
    """Download ``url`` to ``target`` as the module docstring says; returns what was done.

    ``sha256``: the expected digest, or a prefix of at least 8 digits (torchvision's file names carry one);
    None: the file is installed unverified and its computed hash returned. A ``target`` already present is not
    downloaded again (its hash is checked when one is expected). ``progress``: a bar when stderr is a terminal,
    else plain lines given to ``echo`` (default: printed on stderr); False: neither."""
    expected = _check_expected(sha256)
    target = Path(target).expanduser()
    echo = echo or _stderr_line
    if target.is_file():
        digest = file_sha256(target)
        if expected is not None and not _matches(expected, digest):
            raise DownloadError(f"{target}: already there but its sha256 is {digest}, expected {expected}; delete "
                                "it to download it again")
        return Fetched(target, digest, _matches(expected, digest), reused=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    resumed_from, downloaded = offset, 0
    for _ in range(2):  # a second pass only after a stale .part was dropped
        try:
            response = _open(url, offset, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                total = _range_total(exc.headers.get("Content-Range", ""))
                if total == offset:  # the .part holds the whole file already
                    break
                part.unlink()
                offset = resumed_from = 0
                continue
            kept = f"; the partial file {part} is kept" if offset else "; nothing was written"
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}{kept}. The address may have moved: check the "
                                "publisher's page") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"{url}: cannot connect ({reason}); check the network or the proxy variables "
                                "(https_proxy, http_proxy, no_proxy)"
                                + (f"; the partial file {part} is kept" if offset else "")) from None
        with response:
            if response.headers.get_content_type() == "text/html":
                raise DownloadError(f"{url}: the address answers with a web page, not the file; download it by "
                                    f"hand and put it at {target}" + (f" (the partial file {part} is kept)"
                                                                      if offset else ""))
            status = response.status
            if status == 206 and _range_start(response.headers.get("Content-Range", "")) != offset:
                part.unlink(missing_ok=True)  # a range other than the one asked for: take nothing, start over
                offset = resumed_from = 0
                continue
            if status != 206 and offset:
                echo(f"{url}: the server does not resume downloads; starting again")
                offset = resumed_from = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None and length.isdigit() else None
            target.parent.mkdir(parents=True, exist_ok=True)
            meter = _Meter(f"fetch {target.name}", total, offset, progress, echo)
            try:
                with open(part, "ab") as out:  # "ab", not "wb": truncate only once the lock is held
                    _lock(out, part)
                    out.truncate(offset)
                    while True:
                        try:
                            block = response.read(CHUNK)
                        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
                            raise _dropped(url, part, offset + downloaded, total, exc) from None
                        if not block:
                            break
                        out.write(block)
                        downloaded += len(block)
                        meter.advance(len(block))
                    out.flush()
                    os.fsync(out.fileno())
                if total is None or offset + downloaded >= total:
                    meter.finish()
            finally:
                meter.close()
            if total is not None and offset + downloaded < total:
                raise _dropped(url, part, offset + downloaded, total, None)
        break
    else:
        raise DownloadError(f"{url}: the server neither resumed the partial file nor sent the whole file; nothing "
                            "was kept, run again to start over")
    digest = file_sha256(part)
    if expected is not None and not _matches(expected, digest):
        part.unlink()
        raise DownloadError(f"{url}: the downloaded file's sha256 is {digest}, expected {expected}; it was not "
                            f"installed and {part} was removed. Run again to retry; if it persists the published "
                            "file has changed")
    atomic_write(target, lambda tmp: os.replace(part, tmp))
    return Fetched(target, digest, expected is not None, resumed_from=resumed_from, downloaded=downloaded)


def _lock(file, part: Path) -> None:
    """Hold an exclusive lock on the open ``.part`` until it is closed: two processes (e.g. the ranks of a
    ``torchrun`` job) appending to one file would interleave their bytes."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks here
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DownloadError(f"{part}: another process is downloading this file; wait for it to finish (or stop it) "
                            "and run again") from None


def _dropped(url: str, part: Path, have: int, total: Optional[int], exc: Optional[BaseException]) -> DownloadError:
    of = f" of {total}" if total is not None else ""
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return DownloadError(f"{url}: the connection dropped after {have}{of} bytes{why}; the partial file {part} is "
                         "kept: run the same command again to resume")


def _range_start(content_range: str) -> Optional[int]:
    match = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(match.group(1)) if match else None


def _range_total(content_range: str) -> Optional[int]:
    match = re.match(r"bytes\s+(?:\*|\d+-\d+)/(\d+)", content_range.strip())
    return int(match.group(1)) if match else None
