"""A run directory on an object store (s3://, gs://, abfs://, hdfs://: any filesystem `pyarrow.fs` opens).

A run relies on what an object store does not give: file locks, fsync and atomic renames, and listing a folder a
writer is filling is only eventually right on some stores. So a run whose directory is a URI works in a local
*working copy* (the mirror, under thresher's cache folder), with every local guarantee, and keeps the object store
up to date as it goes; the object store is the run directory, the mirror is rebuilt from it:

- when a run starts (or `open_run` reads one), the mirror is made equal to the store (files missing or in another
  version, by size and modification time, are fetched; files the store does not have are removed);
- every batch the driver commits is uploaded at once (side outputs, metrics and state first, the output shard last,
  as the local commit order), so a driver machine that dies loses at most what was in flight, as locally;
- when a step finishes, its folder on the store is made equal to the mirror's (what a resume deleted there, a torn
  batch or an overlapping shard, goes from the store too) and its `_done.json` is uploaded last;
- `manifest.json` is uploaded each time it is written.

Objects are written whole: on S3, GCS and Azure an object appears only when its upload completes, so a reader
never sees half a shard; on other filesystems (HDFS) a file is uploaded under a temporary name and moved.

The Ray runner's workers commit their batches to the store themselves, from a scratch mirror of their own, and read
their input rows from it: every node reaches the store, none needs a shared mount.

Credentials never appear in the URI (it is shown in logs and errors): pyarrow reads them from the environment of
each process (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...), so Ray workers read them from theirs.

One driver at a time: a lease object (`.lease.json`, renewed every 30 s) refuses a second driver while the first is
alive. Object stores have no atomic create-if-absent through pyarrow, so two drivers started within the same second
could both take it; the local lock of the mirror still refuses two drivers on one machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from thresher.errors import PipelineError

log = logging.getLogger("thresher.run_store")
T = TypeVar("T")


def retried(what: str, fn: Callable[[], T]) -> T:
    """`fn()`, tried again on an error from the store (throttling, a dropped connection, a 5xx burst longer than
    pyarrow's client retries on its own), with a doubling wait. A missing object is an answer, not an error."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except OSError as e:
            if attempt == RETRIES - 1 or _missing(e):
                raise
            wait = RETRY_BASE_S * 2**attempt
            log.warning("%s failed (%s); trying again in %.1fs (%d of %d)", what, e, wait, attempt + 2, RETRIES)
            time.sleep(wait)
    raise AssertionError("unreachable")

LEASE = ".lease.json"
RETRIES = 6  # attempts at one store operation, beyond the retries pyarrow's own client makes inside each
RETRY_BASE_S = 0.5  # waits 0.5, 1, 2, 4, 8 s between them: ~15 s of an unreachable or throttling store
LEASE_RENEW_S = 30.0
LEASE_STALE_S = 120.0  # a lease not renewed for this long belongs to a driver that died
_SECRET_QUERY = {"access_key", "secret_key", "session_token", "access_token", "account_key", "sas_token",
                 "client_secret", "credential", "password", "token"}  # fmt: skip
_WHOLE_OBJECT_STORES = {"s3", "gcs", "abfs"}  # an object appears only when its upload is complete


def is_remote(run_dir: str | os.PathLike[str]) -> bool:
    """Whether `run_dir` names a filesystem other than this machine's (a URI other than file://)."""
    text = os.fspath(run_dir)
    return "://" in text and not text.startswith("file://")


def local_path(text: str) -> Path:
    """A run directory that is not on an object store, as a Path (a file:// URI too)."""
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def check_uri(uri: str) -> None:
    """Refuse a run-directory URI that carries a credential: it would reach logs, errors and the manifest."""
    parts = urlsplit(uri)
    secret = sorted(k for k, _ in parse_qsl(parts.query) if k.lower() in _SECRET_QUERY)
    if parts.password is not None:
        secret.append("the password in the address")
    if secret:
        raise PipelineError(
            f"run directory {redact(uri)!r}: credentials in the address ({', '.join(secret)}) would be written to "
            "logs and the manifest; put them in the environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS, ...), on every node of a Ray cluster"
        )


def redact(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None and not any(k.lower() in _SECRET_QUERY for k, _ in parse_qsl(parts.query)):
        return uri
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}"


def mirror_of(uri: str) -> Path:
    """The local working copy of a run directory on an object store: one folder per URI in thresher's cache."""
    from thresher.paths import user_cache_dir

    root = Path(os.environ.get("THRESHER_MIRROR_DIR") or user_cache_dir() / "runs")
    tail = urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1] or "run"
    return root / f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


class RemoteRunDir:
    """A run directory on a pyarrow filesystem, worked on through the local folder `local` (see the module).

    Every local path under `local` has the same relative path under the store's `base`."""

    def __init__(self, uri: str, local: Path | None = None) -> None:
        import pyarrow.fs as pafs

        check_uri(uri)
        self.uri = uri
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError, NotImplementedError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise PipelineError(f"run directory {uri!r}: pyarrow cannot open it ({e})") from e
        self.base = base.rstrip("/")
        self.local = Path(local) if local is not None else mirror_of(uri)
        self.whole_objects = self.fs.type_name in _WHOLE_OBJECT_STORES

    def __repr__(self) -> str:
        return f"RemoteRunDir({self.uri!r}, local={str(self.local)!r})"

    # ---- paths ----------------------------------------------------------------------------------

    def remote(self, path: Path | str) -> str:
        """The store's path of a local path under `local` (or of a path relative to the run directory)."""
        p = Path(path)
        rel = p.relative_to(self.local) if p.is_absolute() else p
        return f"{self.base}/{rel.as_posix()}" if str(rel) != "." else self.base

    def _rel(self, remote_path: str) -> str:
        return remote_path[len(self.base) + 1:]

    def _listing(self, remote_folder: str) -> dict[str, Stamp]:
        """relative path -> (size, modification time) of every file under `remote_folder` (empty when none)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(remote_folder, allow_not_found=True, recursive=True)
        infos = retried(f"listing {remote_folder}", lambda: self.fs.get_file_info(selector))
        return {self._rel(i.path): _stamp_of(i) for i in infos if i.type == pafs.FileType.File}

    # ---- store -> local -------------------------------------------------------------------------

    def pull(self, folder: Path | None = None, *, exact: bool = True) -> int:
        """Make `folder` (default: the whole run directory) in the mirror equal to the store: files missing here or
        in another version (size and modification time: see `Stamp`) are fetched; with `exact`, local files the store
        does not have are removed. Returns how many files were fetched. Hidden files (temporary names, the lease,
        the local lock) are left alone."""
        folder = self.local if folder is None else folder
        remote = self._listing(self.remote(folder))
        fetched = 0
        for rel, stamp in remote.items():
            if _hidden(rel):
                continue
            dest = self.local / rel
            if not _same(dest, stamp):
                self._download(rel, dest, stamp)
                fetched += 1
        if exact and folder.is_dir():
            for p in sorted(folder.rglob("*"), reverse=True):
                rel = p.relative_to(self.local).as_posix()
                if _hidden(rel):
                    continue
                if p.is_file() and rel not in remote:
                    p.unlink()
                elif p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
        return fetched

    def fetch(self, paths: Iterable[Path]) -> None:
        """Download these files of the run directory into the mirror (a worker's committed batch)."""
        for p in paths:
            rel = p.relative_to(self.local).as_posix()
            info = retried(f"reading {self.base}/{rel}", lambda: self.fs.get_file_info(f"{self.base}/{rel}"))  # noqa: B023
            self._download(rel, p, _stamp_of(info))

    def _download(self, rel: str, dest: Path, stamp: Stamp) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")

        def copy() -> None:
            with self.fs.open_input_stream(f"{self.base}/{rel}") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)

        retried(f"fetching {self.base}/{rel}", copy)
        _mark(tmp, stamp)
        os.replace(tmp, dest)

    # ---- local -> store -------------------------------------------------------------------------

    def push(self, paths: Iterable[Path]) -> None:
        """Upload these local files, in the order given (a commit's order); files that do not exist are skipped."""
        for p in paths:
            if p.is_file():
                self._upload(p)

    def _upload(self, path: Path) -> None:
        target = self.remote(path)
        final = target
        if not self.whole_objects:  # a filesystem where a half-written file is visible: upload, then move
            target = f"{final}.{uuid.uuid4().hex[:8]}.tmp"

        def copy() -> Any:
            self._make_parent(final)
            with open(path, "rb") as src, self.fs.open_output_stream(target) as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            if target != final:
                self.fs.move(target, final)
            return self.fs.get_file_info(final)

        # an upload cut off is not an object (S3, GCS, Azure), and the same upload again writes the same bytes
        _mark(path, _stamp_of(retried(f"uploading {final}", copy)))

    def _make_parent(self, target: str) -> None:
        # an object store has no folders to make (pyarrow would write a marker object, a request more an upload)
        if not self.whole_objects:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)

    def sync_up(self, folder: Path, *, last: Iterable[Path] = ()) -> None:
        """Make `folder` on the store equal to the mirror's: upload what the store lacks or holds in another version,
        delete what the mirror no longer has, then upload `last` (a step's `_done.json`: after everything else)."""
        last = [Path(p) for p in last]
        remote = self._listing(self.remote(folder))
        local = {p.relative_to(self.local).as_posix(): p for p in folder.rglob("*") if p.is_file()}
        late = {p.relative_to(self.local).as_posix() for p in last}
        for rel in sorted(set(remote) - set(local)):
            if not _hidden(rel):
                self._delete(f"{self.base}/{rel}")
        for rel, p in sorted(local.items()):
            if _hidden(rel) or rel in late:
                continue
            if rel not in remote or not _same(p, remote[rel]):
                self._upload(p)
        self.push(last)

    def delete(self, paths: Iterable[Path]) -> None:
        """Delete these files of the run directory from the store (a batch taken back); missing ones are fine."""
        for p in paths:
            self._delete(self.remote(p))

    def _delete(self, target: str) -> None:
        def delete() -> None:
            with contextlib.suppress(FileNotFoundError):  # deleted by an attempt whose answer was lost
                self.fs.delete_file(target)

        retried(f"deleting {target}", delete)

    def remove(self, folder: Path) -> None:
        """Delete a folder of the run directory from the store (a step run again from scratch)."""
        import pyarrow.fs as pafs

        target = self.remote(folder)
        if retried(f"reading {target}", lambda: self.fs.get_file_info(target)).type != pafs.FileType.NotFound:
            retried(f"deleting {target}", lambda: self.fs.delete_dir(target))

    # ---- one driver at a time -------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the run directory for this driver: refused while another driver's lease is fresh; renewed every
        LEASE_RENEW_S seconds by a thread; removed at the end."""
        path = f"{self.base}/{LEASE}"
        me = {"holder": f"{socket.gethostname()} pid {os.getpid()}", "host": socket.gethostname(), "pid": os.getpid(),
              "token": uuid.uuid4().hex}  # fmt: skip
        held = self._read_json(path)
        if held and _alive(held) and time.time() - float(held.get("renewed_at", 0)) < LEASE_STALE_S:
            raise PipelineError(
                f"run directory {self.uri} is in use by {held.get('holder', 'another driver')} (its lease was renewed "
                f"{time.time() - float(held['renewed_at']):.0f}s ago); wait for it, or use another run directory"
            )
        stop = threading.Event()

        def renew() -> None:
            self._write_json(path, {**me, "renewed_at": time.time()})

        def keep_renewing() -> None:
            while not stop.wait(LEASE_RENEW_S):
                with contextlib.suppress(OSError):  # a store briefly unreachable: the next renewal tries again
                    renew()

        renew()
        thread = threading.Thread(target=keep_renewing, name="thresher-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(OSError):
                if (self._read_json(path) or {}).get("token") == me["token"]:
                    self.fs.delete_file(path)

    def _read_json(self, path: str) -> dict[str, Any] | None:
        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return bytes(f.read())

        try:
            return dict(json.loads(retried(f"reading {path}", read).decode("utf-8")))
        except ValueError:
            return None
        except OSError as e:
            if _missing(e):
                return None
            raise

    def _write_json(self, path: str, doc: dict[str, Any]) -> None:
        def write() -> None:
            self._make_parent(path)
            with self.fs.open_output_stream(path) as out:
                out.write(json.dumps(doc).encode("utf-8"))

        retried(f"writing {path}", write)


# A local copy of an object carries the object's size and modification time (set on download, and on upload from
# what the store reports), so "same size, same time" says the copy is that version of the object: a file this
# machine wrote since (a recomputed batch, a rewritten metrics file) has its own time, and a newer object on the
# store (another machine carried the run on) has another. Cheaper and safer than comparing sizes alone.
Stamp = tuple[int, float | None]


def _stamp_of(info: Any) -> Stamp:
    mtime = info.mtime
    return int(info.size or 0), (mtime.timestamp() if mtime is not None else None)


def _mark(path: Path, stamp: Stamp) -> None:
    if stamp[1] is not None:
        os.utime(path, (stamp[1], stamp[1]))


def _same(path: Path, stamp: Stamp) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    return stamp[1] is not None and st.st_size == stamp[0] and abs(st.st_mtime - stamp[1]) < 1e-3


def _missing(e: OSError) -> bool:
    """Whether the store said the object does not exist (FileNotFoundError, or a plain OSError on some stores)."""
    text = str(e).lower()
    return isinstance(e, FileNotFoundError) or any(m in text for m in ("not found", "does not exist", "no such"))


def _alive(lease: dict[str, Any]) -> bool:
    """Whether the driver holding `lease` may be running: a driver on this machine whose process is gone is not."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return True  # another machine's driver: only its renewals tell
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hidden(rel: str) -> bool:
    """Temporary files, the lease and the local lock: never copied either way."""
    return any(part.startswith(".") for part in rel.split("/"))


def working_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The local folder to read a run from: `run_dir` itself, or for a URI the mirror, made equal to the store."""
    text = os.fspath(run_dir)
    if not is_remote(text):
        return local_path(text)
    store = RemoteRunDir(text)
    store.pull()
    return store.local
