"""One training process per run directory: an advisory lock on `<workdir>/.run.lock`.

  lock = runlock.RunLock(workdir)           # enabled=False: a no-op (e.g. processes other than 0)
  with lock:                                # raises RunLockedError naming the holder (pid, host)
    train.train_and_evaluate(config, workdir)

  runlock.holder(workdir)                   # {'pid', 'host', 'since'} of a live holder, or None

The lock is `fcntl.flock` on a file in the run directory, so the kernel drops it when the holder
dies, SIGKILL included: a stale lock of a dead process needs no cleanup, the next run takes it over
and rewrites the holder record (the file itself stays; its content only names the last holder).
It works on local disks (and on NFS clients that map flock to byte-range locks).

Not locked: a workdir on cloud storage (`gs://...`, any `scheme://` path). Object stores have no
advisory locks; on a TPU pod each run is started on all hosts at once and the sweep's pod backend
runs one run at a time, so two trainings of one directory do not meet there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from typing import Any

LOCK_FILE = '.run.lock'


class RunLockedError(RuntimeError):
  """The run directory is held by another live process."""

  def __init__(self, workdir: str, info: dict[str, Any] | None):
    self.workdir, self.info = workdir, info or {}
    who = (f'pid {self.info.get("pid", "?")} on {self.info.get("host", "?")}'
           if self.info else 'another process (no holder record yet)')
    since = self.info.get('since')
    when = f' since {time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))}' if since else ''
    super().__init__(f'run directory {workdir} is in use by {who}{when}; wait for it to finish or '
                     'stop it (two trainings of one directory would corrupt its checkpoints)')


def is_local(path: str) -> bool:
  """False for URLs such as gs://bucket/dir (no file locks there)."""
  return re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*://', str(path)) is None


def _read_info(fd: int) -> dict[str, Any] | None:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode('utf-8', 'replace').strip()
    return json.loads(text) if text else None
  except (OSError, ValueError):
    return None


class RunLock:
  """An exclusive lock on a run directory for the lifetime of a training process."""

  def __init__(self, workdir: str, enabled: bool = True, timeout_s: float = 1.0):
    """`timeout_s`: how long to retry before refusing (covers a `holder()` probe that holds the
    lock for a moment; a real holder keeps it for the whole run)."""
    self.workdir = str(workdir)
    self.enabled = enabled and is_local(self.workdir)
    self.timeout_s = timeout_s
    self._fd: int | None = None

  @property
  def path(self) -> str:
    return os.path.join(self.workdir, LOCK_FILE)

  def acquire(self) -> 'RunLock':
    if not self.enabled or self._fd is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + self.timeout_s
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          os.close(fd)
          raise
        if time.monotonic() >= deadline:
          info = _read_info(fd)
          os.close(fd)
          raise RunLockedError(self.workdir, info) from None
        time.sleep(0.05)
    info = {'pid': os.getpid(), 'host': socket.gethostname(), 'since': round(time.time(), 3)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + '\n').encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> 'RunLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def holder(workdir: str) -> dict[str, Any] | None:
  """The holder record of a live lock on `workdir`, or None when nobody holds it (or not local).

  Probes with a shared non-blocking flock held for a moment; `RunLock.acquire` retries briefly, so
  a probe never makes a starting run fail.
  """
  path = os.path.join(str(workdir), LOCK_FILE)
  if not is_local(str(workdir)) or not os.path.exists(path):
    return None
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
      return _read_info(fd) or {}
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)
