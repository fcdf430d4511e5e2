"""Disk faults without node changes: ENOSPC on a small tmpfs, a bit flip or a truncation
in a stopped replica's file, and simulated power loss.

Power loss needs to know what the node made durable. The node records it when (and only
when) started with an explicit fault-injection setting; this is the contract the node
must follow, and :func:`read_sync_log` reads it.

The sync log (JSON lines, one object per line, appended and flushed after the sync call
named in it has *returned*; the last record for a path wins)::

    {"op": "sync", "path": "commitlog/00000000000000000000", "synced_upto": 65536}
        fdatasync/fsync/msync of bytes [0, synced_upto) returned. It asserts: at that
        moment the durable image of the file was its bytes [0, synced_upto) as they are
        now, and zeros after them (append-only, preallocated files: commit log and consume
        queue segments). A node that truncates a file writes zeros over the cut tail,
        syncs, and records the new (lower) synced_upto.
    {"op": "replace", "path": "checkpoint"}
        a file written whole to a temporary name, fsynced, renamed over ``path`` and its
        directory fsynced (checkpoint, cut intent, epoch files): the whole current file is
        durable.
    {"op": "delete", "path": "commitlog/00000000000000000000"}
        unlink of ``path`` made durable (directory fsynced): the file is gone.
    {"op": "fault", "path": ..., "fsync_delay_ms": 200, "fsync_error": null}
        an injected delay or error hit an fdatasync of ``path`` (:class:`SlowFsync`,
        :class:`FsyncError`); it claims nothing and the reader skips it.

``path`` is relative to the node's data directory, with ``/`` separators, or absolute
(the node's :mod:`storage.sync_log` writes absolute paths; records of files outside the
data directory are ignored). Fields beyond these are ignored, so the node may add e.g.
``"t_ms"``. The node writes this log only when started with ``TIDELOG_FAULT_SYNC_LOG``
naming its file; :data:`SYNC_LOG_ENV` and :func:`fault_env` build that setting.

The power-loss transform then rewrites every file of the data directory: synced bytes
stay; each 4 KiB page holding unsynced bytes becomes, at random from the seed, either its
current content or its content as of the last sync (zeros for fresh pages); optionally
one page written as "current" is torn at a 512-byte sector boundary (a prefix of its
sectors new, the rest old). Files with no record at all were never synced: every page is
current or zeros, or, with ``drop_unrecorded``, the file is gone (its directory entry was
never made durable). So a node that creates a file and fsyncs its directory records
``{"op": "sync", "path": ..., "synced_upto": 0}``: the file exists durably, none of its
bytes do yet.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import trio

from storage.sync_log import CONTROL_ENV, SYNC_LOG_ENV
from tools.faults.base import Fault
from tools.faults.process import ProcessTarget, sigkill

__all__ = [
    "CONTROL_ENV",
    "PAGE_BYTES",
    "SECTOR_BYTES",
    "SYNC_LOG_ENV",
    "BitFlip",
    "FileSync",
    "FillDisk",
    "FsyncError",
    "PowerLoss",
    "SlowFsync",
    "SmallTmpfs",
    "Truncate",
    "apply_power_loss",
    "fault_env",
    "power_loss_image",
    "read_sync_log",
]

log = logging.getLogger(__name__)

PAGE_BYTES = 4096
SECTOR_BYTES = 512
FILLER_NAME = ".fault-filler"


# -- power loss: the pure transform ---------------------------------------------------------


def power_loss_image(
    current: bytes,
    synced_upto: int,
    last_synced: bytes,
    rng: random.Random,
    *,
    tear: bool = False,
) -> bytes:
    """The file as a power loss could leave it.

    ``current`` is the file now, ``last_synced`` its durable image at the last sync
    (shorter images are padded with zeros), ``synced_upto`` how many leading bytes of
    ``current`` are known durable. Each page holding unsynced bytes is kept as current or
    reverted to ``last_synced``, from ``rng``; with ``tear`` one kept page is torn at a
    sector boundary. The result has ``current``'s length.
    """
    size = len(current)
    synced_upto = max(0, min(synced_upto, size))
    old = last_synced[:size].ljust(size, b"\0")
    image = bytearray(current)
    kept_pages: list[int] = []
    for page_start in range(synced_upto - synced_upto % PAGE_BYTES, size, PAGE_BYTES):
        if rng.random() < 0.5:
            kept_pages.append(page_start)
            continue
        start = max(page_start, synced_upto)
        end = min(page_start + PAGE_BYTES, size)
        image[start:end] = old[start:end]
    if tear and kept_pages:
        page_start = rng.choice(kept_pages)
        sectors = -(-min(PAGE_BYTES, size - page_start) // SECTOR_BYTES)
        torn_from = page_start + rng.randrange(1, sectors + 1) * SECTOR_BYTES
        start = max(torn_from, synced_upto)
        end = min(page_start + PAGE_BYTES, size)
        if start < end:
            image[start:end] = old[start:end]
    return bytes(image)


@attrs.frozen
class FileSync:
    """What the sync log says about one file: durable prefix, or whole-file replace."""

    path: str
    synced_upto: int = 0
    replaced: bool = False
    deleted: bool = False


def read_sync_log(path: Path, data_dir: Path | None = None) -> dict[str, FileSync]:
    """The last record per file. A torn last line (the node died writing it) is ignored:
    the record is written only after its sync returned, so losing it loses no promise.
    Absolute paths are made relative to ``data_dir`` (those outside it are dropped)."""
    records: dict[str, FileSync] = {}
    roots = _roots(data_dir)
    if not path.exists():
        return records
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record: {line[:80]!r}") from None
        name, op = record.get("path"), record.get("op")
        if op == "fault":  # an injected fsync delay or error: no durability claim
            continue
        if not isinstance(name, str) or op not in ("sync", "replace", "delete"):
            raise ValueError(f"{path}:{number}: needs op sync|replace|delete and a path: {record}")
        if os.path.isabs(name):
            relative = _relative(name, roots)
            if relative is None:
                continue
            name = relative
        if op == "sync":
            records[name] = FileSync(name, synced_upto=int(record["synced_upto"]))
        elif op == "replace":
            records[name] = FileSync(name, replaced=True)
        else:
            records[name] = FileSync(name, deleted=True)
    return records


def _roots(data_dir: Path | None) -> tuple[str, ...]:
    if data_dir is None:
        return ()
    return tuple(dict.fromkeys([os.path.abspath(data_dir), str(Path(data_dir).resolve())]))


def _relative(name: str, roots: tuple[str, ...]) -> str | None:
    """``name`` relative to the first root holding it, with ``/`` separators, or None."""
    for root in roots:
        if os.path.commonpath([root, name]) == root and name != root:
            return Path(os.path.relpath(name, root)).as_posix()
    return None


def apply_power_loss(
    data_dir: Path,
    syncs: Mapping[str, FileSync],
    *,
    seed: int,
    tear: bool = False,
    skip: Iterable[Path] = (),
    drop_unrecorded: bool = False,
) -> dict[str, int]:
    """Blocking: rewrite every file under ``data_dir`` as a power loss could leave it
    (see the module doc). Returns, per file, how many bytes changed (a dropped file counts
    all its bytes). ``skip`` names files left alone (the sync log itself when it lives in
    the data directory)."""
    rng = random.Random(seed)
    skipped = {Path(path).resolve() for path in skip}
    changed: dict[str, int] = {}
    for file in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        if file.resolve() in skipped:
            continue
        name = file.relative_to(data_dir).as_posix()
        record = syncs.get(name)
        if record is not None and record.replaced:
            continue
        if drop_unrecorded and (record is None or record.deleted):
            changed[name] = file.stat().st_size
            file.unlink()
            continue
        current = file.read_bytes()
        synced_upto = 0 if record is None or record.deleted else record.synced_upto
        last_synced = current[:synced_upto]
        image = power_loss_image(current, synced_upto, last_synced, rng, tear=tear)
        if image != current:
            with open(file, "r+b") as handle:
                handle.write(image)
                handle.flush()
                os.fsync(handle.fileno())
            changed[name] = sum(1 for a, b in zip(image, current, strict=True) if a != b)
    log.info(
        "power loss applied data_dir=%s seed=%d files_changed=%d", data_dir, seed, len(changed)
    )
    return changed


class PowerLoss(Fault):
    """SIGKILL the node, then rewrite its data directory as a power loss could leave it
    (from the sync log the node wrote under its fault-injection setting); ``heal()``
    restarts it on what is left."""

    kind = "power-loss"

    def __init__(
        self,
        target: ProcessTarget,
        data_dir: Path,
        sync_log: Path,
        *,
        seed: int,
        tear: bool = False,
        drop_unrecorded: bool = False,
    ) -> None:
        super().__init__()
        self.target, self.data_dir, self.sync_log = target, Path(data_dir), Path(sync_log)
        self.seed, self.tear, self.drop_unrecorded = seed, tear, drop_unrecorded
        self.changed: dict[str, int] = {}

    def fields(self) -> dict[str, object]:
        return {
            "target": repr(self.target),
            "seed": self.seed,
            "tear": self.tear,
            "files_changed": len(self.changed),
            "bytes_changed": sum(self.changed.values()),
        }

    async def _inject(self) -> None:
        await sigkill(self.target)
        syncs = read_sync_log(self.sync_log, self.data_dir)
        self.changed = await trio.to_thread.run_sync(
            lambda: apply_power_loss(
                self.data_dir,
                syncs,
                seed=self.seed,
                tear=self.tear,
                skip=[self.sync_log],
                drop_unrecorded=self.drop_unrecorded,
            )
        )

    async def _heal(self) -> None:
        await self.target.restart()


def fault_env(sync_log: Path, control: Path | None = None) -> dict[str, str]:
    """The environment that turns a node's fault injection on: it records its syncs to
    ``sync_log`` (for :class:`PowerLoss`) and obeys ``control`` (for :class:`SlowFsync`
    and :class:`FsyncError`). Never for a normal run."""
    env = {SYNC_LOG_ENV: str(Path(sync_log).absolute())}
    if control is not None:
        env[CONTROL_ENV] = str(Path(control).absolute())
    return env


# -- EIO and slow fsync: the node's disk control file ---------------------------------------


def _write_control(path: Path, fields: dict[str, object]) -> None:
    """Blocking: replace the control file whole (the node never reads half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fields))
    os.replace(tmp, path)


class _DiskControlFault(Fault):
    """Write the control file of a node started with :func:`fault_env` (``control``);
    its next segment fdatasyncs obey it. ``heal()`` removes the file."""

    def __init__(self, control: Path) -> None:
        super().__init__()
        self.control = Path(control)

    @abc.abstractmethod
    def control_fields(self) -> dict[str, object]:
        """What the fault asks of the node's disk (the control file's fields)."""

    def fields(self) -> dict[str, object]:
        return {"control": self.control, **self.control_fields()}

    async def _inject(self) -> None:
        await trio.to_thread.run_sync(_write_control, self.control, self.control_fields())

    async def _heal(self) -> None:
        await trio.to_thread.run_sync(lambda: self.control.unlink(missing_ok=True))


class SlowFsync(_DiskControlFault):
    """Every segment fdatasync of the node waits ``delay_ms`` first (a slow disk)."""

    kind = "slow-fsync"

    def __init__(self, control: Path, *, delay_ms: int = 200) -> None:
        super().__init__(control)
        if delay_ms <= 0:
            raise ValueError(f"slow-fsync needs a positive delay_ms, got {delay_ms}")
        self.delay_ms = delay_ms

    def control_fields(self) -> dict[str, object]:
        return {"fsync_delay_ms": self.delay_ms}


class FsyncError(_DiskControlFault):
    """The node's segment fdatasyncs fail with ``error`` (EIO by default). A node must then
    refuse writes and acknowledge nothing past its last good sync until restarted, so
    ``heal()`` removes the control file and, with a ``target``, SIGKILLs and restarts it."""

    kind = "eio"

    def __init__(
        self, control: Path, *, target: ProcessTarget | None = None, error: str = "EIO"
    ) -> None:
        super().__init__(control)
        self.target, self.error = target, error

    def control_fields(self) -> dict[str, object]:
        return {"fsync_error": self.error}

    async def _heal(self) -> None:
        await super()._heal()
        if self.target is not None:
            if self.target.pid is not None:
                await sigkill(self.target)
            await self.target.restart()


# -- ENOSPC: a small tmpfs and a filler ----------------------------------------------------


class SmallTmpfs:
    """A tmpfs of ``size_bytes`` mounted on a fresh directory ``mountpoint`` (created
    here, removed on close): put a node's data directory inside to make it run out of
    space. Needs root. ``async with SmallTmpfs(path, size_bytes) as mountpoint:``."""

    def __init__(self, mountpoint: Path, size_bytes: int) -> None:
        if size_bytes < PAGE_BYTES:
            raise ValueError(f"a tmpfs needs at least {PAGE_BYTES} bytes, got {size_bytes}")
        self.mountpoint = Path(mountpoint)
        self.size_bytes = size_bytes
        self.mounted = False

    async def __aenter__(self) -> Path:
        if os.geteuid() != 0:
            raise PermissionError(f"mounting a tmpfs needs root (euid={os.geteuid()})")
        self.mountpoint.mkdir(parents=True, exist_ok=False)
        try:
            await _run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={self.size_bytes}",
                    "tmpfs",
                    str(self.mountpoint),
                ]
            )
        except BaseException:
            self.mountpoint.rmdir()
            raise
        self.mounted = True
        log.info("tmpfs mounted path=%s size_bytes=%d", self.mountpoint, self.size_bytes)
        return self.mountpoint

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True):
            if self.mounted:
                await _run(["umount", str(self.mountpoint)])
                self.mounted = False
            self.mountpoint.rmdir()
            log.info("tmpfs unmounted path=%s", self.mountpoint)


async def _run(argv: list[str]) -> None:
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace').strip()}"
        )


def _fill(path: Path, leave_bytes: int) -> int:
    """Blocking: grow ``path`` until the filesystem has at most ``leave_bytes`` free."""
    written = 0
    block = bytes(64 * 1024)
    with open(path, "wb") as handle:
        while True:
            stats = os.statvfs(path.parent)
            free = stats.f_bavail * stats.f_frsize
            if free <= leave_bytes:
                break
            try:
                handle.write(block[: max(1, min(len(block), free - leave_bytes))])
                handle.flush()
            except OSError:
                break
            written = handle.tell()
    return written


class FillDisk(Fault):
    """Fill the filesystem holding ``directory`` (a :class:`SmallTmpfs` in tests and
    chaos runs) so the next allocation fails with ENOSPC; ``heal()`` deletes the filler."""

    kind = "enospc"

    def __init__(self, directory: Path, *, leave_bytes: int = 0) -> None:
        super().__init__()
        self.filler = Path(directory) / FILLER_NAME
        self.leave_bytes = leave_bytes
        self.filled_bytes = 0

    def fields(self) -> dict[str, object]:
        return {"filler": self.filler, "filled_bytes": self.filled_bytes}

    async def _inject(self) -> None:
        self.filled_bytes = await trio.to_thread.run_sync(_fill, self.filler, self.leave_bytes)

    async def _heal(self) -> None:
        await trio.to_thread.run_sync(lambda: self.filler.unlink(missing_ok=True))


# -- corruption of a stopped replica's file ------------------------------------------------


def _require_stopped(target: ProcessTarget | None, path: Path) -> None:
    if target is not None and target.pid is not None:
        raise RuntimeError(
            f"refusing to corrupt {path}: its node {target!r} is running (pid={target.pid}); stop it first"
        )


class BitFlip(Fault):
    """Flip one bit of ``path`` at ``offset`` (or a seeded offset within ``[start, end)``).
    The node owning the file must be stopped (pass it as ``target`` to have that checked).
    ``heal()`` restores the original byte, for runs that go on with a healthy replica."""

    kind = "corrupt"

    def __init__(
        self,
        path: Path,
        *,
        offset: int | None = None,
        seed: int = 0,
        start: int = 0,
        end: int | None = None,
        target: ProcessTarget | None = None,
    ) -> None:
        super().__init__()
        self.path, self.target = Path(path), target
        self.requested_offset, self.seed, self.start, self.end = offset, seed, start, end
        self.offset: int | None = None
        self.bit: int | None = None
        self.original: int | None = None

    def fields(self) -> dict[str, object]:
        return {"path": self.path, "offset": self.offset, "bit": self.bit}

    def _choose(self, size: int) -> tuple[int, int]:
        rng = random.Random(self.seed)
        if self.requested_offset is not None:
            offset = self.requested_offset
        else:
            end = size if self.end is None else min(self.end, size)
            if not 0 <= self.start < end:
                raise ValueError(
                    f"no byte to flip in [{self.start}, {end}) of {self.path} ({size} bytes)"
                )
            offset = rng.randrange(self.start, end)
        if not 0 <= offset < size:
            raise ValueError(f"offset {offset} is outside {self.path} ({size} bytes)")
        return offset, rng.randrange(8)

    def _flip(self) -> None:
        with open(self.path, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            self.offset, self.bit = self._choose(size)
            handle.seek(self.offset)
            self.original = handle.read(1)[0]
            handle.seek(self.offset)
            handle.write(bytes([self.original ^ (1 << self.bit)]))
            handle.flush()
            os.fsync(handle.fileno())

    def _restore(self) -> None:
        assert self.offset is not None and self.original is not None
        with open(self.path, "r+b") as handle:
            handle.seek(self.offset)
            handle.write(bytes([self.original]))
            handle.flush()
            os.fsync(handle.fileno())

    async def _inject(self) -> None:
        _require_stopped(self.target, self.path)
        await trio.to_thread.run_sync(self._flip)

    async def _heal(self) -> None:
        _require_stopped(self.target, self.path)
        await trio.to_thread.run_sync(self._restore)


class Truncate(Fault):
    """Cut ``path`` to ``length`` bytes (or a seeded length below its size), keeping the
    cut tail so ``heal()`` can put it back. The owning node must be stopped."""

    kind = "truncate"

    def __init__(
        self,
        path: Path,
        *,
        length: int | None = None,
        seed: int = 0,
        target: ProcessTarget | None = None,
    ) -> None:
        super().__init__()
        self.path, self.target, self.requested_length, self.seed = Path(path), target, length, seed
        self.length: int | None = None
        self.tail = b""

    def fields(self) -> dict[str, object]:
        return {"path": self.path, "length": self.length, "cut_bytes": len(self.tail)}

    def _cut(self) -> None:
        data = self.path.read_bytes()
        length = self.requested_length
        if length is None:
            if not data:
                raise ValueError(f"{self.path} is empty: nothing to truncate")
            length = random.Random(self.seed).randrange(len(data))
        if not 0 <= length <= len(data):
            raise ValueError(f"length {length} is outside {self.path} ({len(data)} bytes)")
        self.length, self.tail = length, data[length:]
        with open(self.path, "r+b") as handle:
            handle.truncate(length)
            os.fsync(handle.fileno())

    def _restore(self) -> None:
        assert self.length is not None
        with open(self.path, "r+b") as handle:
            handle.truncate(self.length)
            handle.seek(self.length)
            handle.write(self.tail)
            handle.flush()
            os.fsync(handle.fileno())

    async def _inject(self) -> None:
        _require_stopped(self.target, self.path)
        await trio.to_thread.run_sync(self._cut)

    async def _heal(self) -> None:
        _require_stopped(self.target, self.path)
        await trio.to_thread.run_sync(self._restore)
