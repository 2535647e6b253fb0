"""One writer per run folder: ``RUN_DIR/train.lock``, held with ``fcntl.flock`` for the run's life.

The lock is an advisory ``flock`` on an open file, so the operating system releases it
when the process ends in any way (exit, crash, ``kill -9``); a stale lock file never
blocks a later run. The file holds who took the lock (pid, host, start time), which a
refused trainer names. The file is removed when the lock is released; since another
process may have opened the old file just before that, a lock is only valid when the
locked file is still the one at the path (same inode), otherwise it is taken again.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

LOCK_FILE = "train.lock"


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock."""


class RunLock:
    """``with RunLock(run_dir):`` — exclusive use of ``run_dir`` (created if needed).

    Raises ``RunFolderBusy`` naming the holder when another process has it. On release the
    lock file is removed, and so is ``run_dir`` when this lock created it and it is still
    empty (a command refused before writing anything leaves no trace).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._handle = None
        self._created_folder = False

    def acquire(self) -> "RunLock":
        import fcntl

        self._created_folder = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process (it wrote no details yet)"
                handle.close()
                self._remove_created_folder()
                raise RunFolderBusy(f"run folder {self.run_dir} is in use by {holder}; wait for that "
                                    "trainer to finish (or stop it), or choose another --out") from None
            if _same_file(handle, self.path):
                break
            handle.close()  # the holder removed the file meanwhile: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody else can hold it now
        self._handle.close()  # closing the file releases the flock
        self._handle = None
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        if self._created_folder:
            try:
                self.run_dir.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(handle, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
