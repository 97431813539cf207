"""What keeps the processes sharing a grid out of each other's way: the lease heartbeat of the run a process holds
(:class:`_Heartbeat`, renewing :meth:`.store.ResultStore.renew`) and the lock file of a pretraining the shards share
(:class:`_Lock`)."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import MedTransferError
from .store import Claimant, _alive_here

log = logging.getLogger(__name__)


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
