"""Where a run's files go: a local folder or an object store (`gs://...`), through one layer.

Orbax already writes checkpoints through `etils.epath`; everything else a run or an evaluation
writes (metrics.jsonl, TensorBoard events, config.json, results, plots, sample transcripts) goes
through this module, which uses the same `epath`, so that with a `gs://` workdir on a pod nothing
lands on worker 0's local disk.

Object stores have no append: an object is written whole when its stream closes. A file that
grows (metrics.jsonl, an event file) is therefore a `GrowingFile`: appended to on a local disk,
and on a remote path kept in memory and written whole at each flush, at most every
`min_interval_s` seconds (and always at close), so that a long run does not rewrite its log
on every step. A resumed run reads the remote log back first and keeps growing it.
"""

from __future__ import annotations

import io
import os
import time
from typing import IO

from etils import epath
from tensorboardX import record_writer

# Seconds between whole-object rewrites of a growing remote file (local files flush every time).
REMOTE_FLUSH_S = 30.0


def is_remote(path: str | os.PathLike) -> bool:
  """A URL (`gs://bucket/...`) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute (Orbax requires it); a URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str | os.PathLike, *parts: str) -> str:
  return os.fspath(epath.Path(path).joinpath(*parts))


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
  """A file object for reading or writing whole ("r", "rb", "w", "wb"); never append."""
  if "a" in mode:
    raise ValueError(f"{path}: append is not portable to object stores; use GrowingFile")
  return epath.Path(path).open(mode)


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes the whole file (one object on a remote path), creating its folder."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(text, encoding="utf-8")


def save_figure(fig, path: str | os.PathLike, dpi: int = 80) -> None:
  """A matplotlib figure as a PNG at `path`, local or remote."""
  with open_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)


def upload_folder(local: str | os.PathLike, remote: str | os.PathLike) -> None:
  """Copies the files of a local folder (not its subfolders) to `remote`, one object each."""
  makedirs(remote)
  for name in sorted(os.listdir(local)):
    source = os.path.join(local, name)
    if os.path.isfile(source):
      with open(source, "rb") as f:
        epath.Path(remote).joinpath(name).write_bytes(f.read())


class GrowingFile:
  """A file that is only appended to: a log. Local: appended and flushed on every `flush`.
  Remote: kept whole in memory (with what the object held when opened, if `resume`) and
  written whole when a flush comes `min_interval_s` after the last write, and at close."""

  def __init__(self, path: str | os.PathLike, *, binary: bool = False, resume: bool = True,
               min_interval_s: float = REMOTE_FLUSH_S):
    self.path = os.fspath(path)
    self.binary = binary
    self.remote = is_remote(self.path)
    self.min_interval_s = min_interval_s
    if self.remote:
      p = epath.Path(self.path)
      self._buffer = io.BytesIO()
      if resume and p.exists():
        self._buffer.write(p.read_bytes())
      self._written_at = time.monotonic()
      self._dirty = False
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      mode = ("a" if resume else "w") + ("b" if binary else "")
      encoding = None if binary else "utf-8"
      self._file = open(self.path, mode, encoding=encoding)  # pylint: disable=consider-using-with

  def write(self, data: str | bytes) -> None:
    if self.remote:
      self._buffer.write(data if self.binary else data.encode("utf-8"))
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self, force: bool = False) -> None:
    if not self.remote:
      self._file.flush()
      return
    if self._dirty and (force or time.monotonic() - self._written_at >= self.min_interval_s):
      epath.Path(self.path).write_bytes(self._buffer.getvalue())
      self._written_at = time.monotonic()
      self._dirty = False

  def close(self) -> None:
    if self.remote:
      self.flush(force=True)
    else:
      self._file.close()


class _EventFileFactory:
  """tensorboardX's writer factory for URLs: event files as GrowingFiles through epath
  (tensorboardX's own `gs` writer needs google-cloud-storage and its credentials path)."""

  def open(self, path: str) -> GrowingFile:
    # Every writer session starts a new event file (its name carries a timestamp and the host).
    return GrowingFile(path, binary=True, resume=False)

  def directory_check(self, path: str) -> None:
    del path  # object stores need no folders


record_writer.register_writer_factory("gs", _EventFileFactory())
