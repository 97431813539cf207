"""What keeps the processes sharing a grid out of each other's way: who claims a run (:class:`Claimant`) and how
long its lease holds, when a running row is free to take over (:func:`_free`, used by
:meth:`.store.ResultStore.claim_next`), the heartbeat that renews the lease of the run a process holds
(:class:`_Heartbeat`) and the lock file of a pretraining the shards share (:class:`_Lock`)."""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import MedTransferError

log = logging.getLogger(__name__)

# How long a claim holds a running row without renewal, and how often its owner renews it. The lease must outlast
# the longest pause of a live owner (a loaded file system, a laptop lid shut for less than that); a dead owner on
# another host blocks its run for at most this long. Clocks of the hosts sharing a store must agree to well within
# LEASE_SECONDS (NTP does).
LEASE_SECONDS = 300.0
HEARTBEAT_SECONDS = 30.0


@dataclass(frozen=True)
class Claimant:
    """Who claims runs: ``host`` (``hostname:pid``), a random ``token`` told apart from any other claim (also from an
    earlier grid of the same pid), and the ``lease`` in seconds each claim or renewal holds the row for."""

    host: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    lease: float = LEASE_SECONDS

    def __post_init__(self) -> None:
        if not (isinstance(self.lease, (int, float)) and math.isfinite(self.lease) and self.lease > 0):
            raise ValueError(f"lease {self.lease!r}: a lease is a positive number of seconds, e.g. {LEASE_SECONDS:g}")


def _free(run_id: str, status: str, attempts: int, host: str | None, token: str | None, lease_until: float | None, *,
          claimant: Claimant, retry: Mapping[str, int] | None, now: float) -> bool:
    """Whether ``claimant`` may start the run of a row in this state (see :meth:`ResultStore.claim_next`)."""
    if status == "pending":
        return True
    if status == "failed":
        return retry is not None and retry.get(run_id) == attempts
    if status != "running":
        return False
    if token is not None and token == claimant.token:
        return True  # already ours
    alive = _alive_here(host) if host else None
    if lease_until is None:
        return alive is not True or host == claimant.host  # no lease: only a live local owner can be told
    return lease_until <= now or alive is False  # an expired or released lease; a dead local owner at once


def _alive_here(owner: str) -> bool | None:
    """For a ``host:pid`` owner: True if that process runs on this host, False if it is gone, None when it belongs to
    another host (or cannot be read), where nothing can be told."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):  # a pid no process can have
        return False
    return True


class _Lock:
    """An exclusive lock file (``O_EXCL``) naming its owner; another process waits until ``wait_for()`` holds or
    the lock goes away. A lock left by a dead process on this host is taken over."""

    def __init__(self, path: Path, wait_for: Callable[[], bool], poll: float = 5.0) -> None:
        self.path, self.wait_for, self.poll, self.held = path, wait_for, poll, False

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self.wait_for():
                    return self
                if _owner_dead(self.path):
                    self.path.unlink(missing_ok=True)
                    continue
                time.sleep(self.poll)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _owner_dead(path: Path) -> bool:
    """True when the lock's owner is a process of this host that no longer runs."""
    try:
        return _alive_here(path.read_text()) is False
    except OSError:
        return False


class _Heartbeat:
    """Renews the lease of the run this process holds, every ``every`` seconds, from a daemon thread with its own
    store connection (SQLite connections stay in their thread). A process that dies stops renewing, so its lease
    expires and another process may take the run over."""

    def __init__(self, path: Path, claimant: Claimant, every: float) -> None:
        self.path, self.claimant, self.every = path, claimant, every
        self.held: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medtransfer-lease", daemon=True)
        self._thread.start()

    def hold(self, run_id: Optional[str]) -> None:
        self.held = run_id

    def _run(self) -> None:
        from .store import ResultStore

        store: Optional[ResultStore] = None
        try:
            while not self._stop.wait(self.every):
                rid = self.held
                if rid is None:
                    continue
                try:
                    store = store or ResultStore(self.path)
                    if not store.renew(rid, self.claimant):
                        log.warning("the lease on run %s could not be renewed: another process took it over", rid)
                        self.held = None
                except (sqlite3.Error, MedTransferError) as exc:  # a busy or flaky file system: try next beat
                    log.warning("renewing the lease on run %s failed (%s); retrying in %g s", rid, exc, self.every)
        finally:
            if store is not None:
                store.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
