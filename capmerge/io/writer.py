"""Streaming safetensors output: header space reserved first, data streamed after it, header written last.

The safetensors library has no streaming writer (``save_file`` needs every tensor in memory). Here each output
file reserves room for its header, tensor data is written in order at known offsets (by the engine's writer
thread), and the final header — listing only the tensors actually kept — is written into the reserved room and
padded with spaces, which the format allows. That lets ``diff`` leave out all-zero tensors without a second pass.

:class:`Output` owns the temporary sibling of OUT and makes the result appear atomically (or not at all). The
temporary's name says which process writes it — ``.<OUT name>.capmerge-tmp-<pid>-<start>-<boot>-<random>``, where
``start`` is the process's start time (clock ticks since boot) and ``boot`` a short hash of the boot id — so a later
run for the same OUT removes the temporaries of writers that are gone (killed, crashed) and never those of a writer
still running, even when its PID was reused. Temporary names always fit the file-name limit: a long OUT name is cut
and completed with a hash of the whole name.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capmerge.errors import CheckpointError, OutputExistsError, UsageError, WriteError
from capmerge.io.checkpoint import (
    DTYPES,
    WEIGHT_SUFFIXES,
    Checkpoint,
    checkpoint_bounds,
    leads_outside,
    parse_header,
)

DIRECT_ALIGN = 4096  # file offsets, lengths and memory addresses of O_DIRECT writes: a multiple of block sizes in use
DIRECT_MIN = 1 << 16  # bytes: a smaller write goes through the page cache
DIRECT_STAGE = 8 << 20  # bytes of the aligned buffer that an unaligned source is copied through
# file systems on a local block device, where O_DIRECT writes run at the device's speed; elsewhere (network and FUSE
# file systems, tmpfs, overlays) the output goes through the page cache as usual
DIRECT_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs", "jfs", "reiserfs"})


def direct_io_wanted() -> bool:
    """``CAPMERGE_DIRECT_IO``: ``0``/``off`` writes every output through the page cache (the default is on)."""
    return os.environ.get("CAPMERGE_DIRECT_IO", "1").strip().lower() not in {"0", "off", "false", "no"}


def fs_type(path: str | os.PathLike[str], mountinfo: str | os.PathLike[str] = "/proc/self/mountinfo") -> str | None:
    """The type of the file system holding ``path``: that of the deepest mount point above it in ``mountinfo``
    (Linux's, proc(5)), or None where that cannot be told."""
    try:
        real = os.path.realpath(path)
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best, kind = -1, None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # spaces etc. are escaped
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= best:  # the later of equal mount points is the one on top
            best, kind = len(mnt), rest[0]
    return kind


class WritePaths:
    """Write by write, O_DIRECT or the page cache: the path that has moved more bytes per second lately (an average
    over its recent writes; each path measured once first, then the slower one every :attr:`PROBE`-th write).

    Neither is faster everywhere. The page cache takes a write at memory speed into pages freed just before (3 GB/s
    on the benchmark's VM), but into fresh memory on a VM that hands free memory back to its host at 0.4 GB/s, and
    each byte costs CPU time; O_DIRECT goes at the disk's speed (1.0–1.3 GB/s there) and leaves the CPUs to the
    computing."""

    PROBE = 16

    def __init__(self) -> None:
        self.rate: dict[bool, float | None] = {True: None, False: None}  # bytes per second, by path (direct?)
        self.n = 0

    def choose(self) -> bool:
        """True: O_DIRECT for the next write."""
        self.n += 1
        d, b = self.rate[True], self.rate[False]
        if d is None or b is None:
            return d is None
        faster = d >= b
        return not faster if self.n % self.PROBE == 0 else faster

    def record(self, direct: bool, nbytes: int, seconds: float) -> None:
        """A write of ``nbytes`` by the path ``direct`` took ``seconds``."""
        r = nbytes / max(seconds, 1e-9)
        old = self.rate[direct]
        self.rate[direct] = r if old is None else 0.75 * old + 0.25 * r


def _address(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte; None for a read-only one."""
    import ctypes

    if view.readonly or not len(view):
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@dataclass
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _entry_json(name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> str:
    return json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}})


class SafetensorsFile:
    """One safetensors file written in a streaming way.

    Args:
        path: the file to create (must not exist).
        planned: (name, dtype, shape) of every tensor that may be written, to size the header room.
        metadata_room: bytes reserved for ``__metadata__``.
        check_space: refuse at once when the disk has less free space than the planned size.
        direct: write the data's whole aligned blocks with O_DIRECT (:meth:`write_at`), where the file system is
            on a local disk; None: as ``CAPMERGE_DIRECT_IO`` says (on unless it is ``0``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        planned: list[tuple[str, str, tuple[int, ...]]],
        *,
        metadata_room: int = 1 << 16,
        check_space: bool = True,
        direct: bool | None = None,
    ) -> None:
        self.path = os.fspath(path)
        total = sum(_nbytes(d, s) for _, d, s in planned)
        room = metadata_room + 64 + sum(len(_entry_json(n, d, s, total, total)) for n, d, s in planned)
        self.reserve = (room + 7) // 8 * 8
        self.data_start = 8 + self.reserve
        self.entries: list[Entry] = []
        self.pos = 0
        self.dfd = -1  # the same file opened with O_DIRECT, or -1
        self._stage: mmap.mmap | None = None
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as e:
            raise WriteError(f"cannot create output file: {e.strerror or e}", self.path) from e
        wanted = direct_io_wanted() if direct is None else direct
        if wanted and hasattr(os, "O_DIRECT") and fs_type(self.path) in DIRECT_FS:
            with contextlib.suppress(OSError):  # no O_DIRECT there: through the page cache
                self.dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        if check_space and total and hasattr(os, "statvfs"):
            # A cheap early refusal; a disk that fills up during the run still fails cleanly (nothing left behind).
            # (posix_fallocate would reserve the space for sure, but makes the writes ~2x slower on ext4.)
            try:
                st = os.statvfs(self.path)
                free = st.f_bavail * st.f_frsize
            except OSError:
                free = None
            if free is not None and free < self.data_start + total:
                self.close()
                os.unlink(self.path)
                raise WriteError(
                    f"not enough disk space: {self.data_start + total} bytes needed, {free} free", self.path
                )

    def place(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> int:
        """Reserve the next ``nbytes`` of data for a tensor; returns its absolute file offset."""
        begin = self.pos
        self.pos += nbytes
        self.entries.append(Entry(name, dtype, tuple(shape), begin, self.pos))
        return self.data_start + begin

    def takes_direct(self, nbytes: int) -> bool:
        """Whether a write of ``nbytes`` can go (in part) by O_DIRECT: the file has a direct descriptor (a local
        disk, not turned off by an EINVAL) and the write is at least :data:`DIRECT_MIN`."""
        return self.dfd >= 0 and nbytes >= DIRECT_MIN

    def write_at(self, data: bytes | bytearray | memoryview, offset: int, *, direct: bool = True) -> None:
        """Write ``data`` at the absolute file ``offset`` (``direct`` False: through the page cache only).

        With O_DIRECT (``dfd``), the whole :data:`DIRECT_ALIGN` blocks inside the range go straight to the disk, the
        ragged ends (and writes under :data:`DIRECT_MIN`) through the page cache. A direct write skips the copy into
        the page cache and its fresh pages (on a VM that hands freed memory back to its host, touching fresh pages is
        what costs most: 1.9 GB took 0.4 s into pages just freed, 5 s after a few seconds idle), and leaves the
        cache to the inputs. A source whose address is not aligned is copied through an aligned buffer. Where the
        file system refuses a direct write (EINVAL), this file goes on through the page cache."""
        view = memoryview(data).cast("B")
        try:
            if direct and self.takes_direct(len(view)):
                head = -offset % DIRECT_ALIGN
                mid = (len(view) - head) // DIRECT_ALIGN * DIRECT_ALIGN
                _pwrite_all(self.fd, view[:head], offset)
                view, offset = view[head:], offset + head
                if self._write_direct(view[:mid], offset):
                    view, offset = view[mid:], offset + mid
            _pwrite_all(self.fd, view, offset)
        except OSError as e:
            raise _write_error(e, self.path) from e

    def _write_direct(self, view: memoryview, offset: int) -> bool:
        """``view`` (whole aligned blocks) at ``offset`` (aligned) with O_DIRECT; False where the file system
        refused it (direct writes are then off for this file, and the caller writes it again)."""
        try:
            addr = _address(view)
            if addr is not None and addr % DIRECT_ALIGN == 0:
                _pwrite_all(self.dfd, view, offset)
                return True
            if self._stage is None:
                self._stage = mmap.mmap(-1, DIRECT_STAGE)  # anonymous: page-aligned
            stage = memoryview(self._stage)
            try:
                for pos in range(0, len(view), DIRECT_STAGE):
                    k = min(DIRECT_STAGE, len(view) - pos)
                    stage[:k] = view[pos : pos + k]
                    _pwrite_all(self.dfd, stage[:k], offset + pos)
            finally:
                stage.release()
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            os.close(self.dfd)
            self.dfd = -1
            return False
        return True

    def discard_last(self) -> None:
        """Forget the last placed tensor; the next one overwrites its bytes."""
        e = self.entries.pop()
        self.pos = e.begin

    @property
    def data_bytes(self) -> int:
        return self.pos

    def finish(self, metadata: dict[str, str]) -> int:
        """Write the header into the reserved room, cut the file to size, close it. Returns the file size."""
        hdr: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        for e in self.entries:
            hdr[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
        raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.reserve:
            raise WriteError(f"header ({len(raw)} bytes) does not fit its reserved room ({self.reserve})", self.path)
        raw += b" " * (self.reserve - len(raw))  # reserve % 8 == 0: the data starts 8-aligned, as the reference pads
        size = self.data_start + self.pos
        head = struct.pack("<Q", self.reserve)
        try:  # the same validation as every input gets: never write a header that a loader would refuse
            parse_header(self.path, head, raw, size)
        except CheckpointError as e:
            raise WriteError(f"refusing to write an invalid header: {e.what}", self.path) from None
        try:
            _pwrite_all(self.fd, head + raw, 0)
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise _write_error(e, self.path) from e
        self.close()
        return size

    def close(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPES[dtype][0]
    for s in shape:
        n *= s
    return n


def _write_error(e: OSError, path: str) -> WriteError:
    if e.errno == errno.ENOSPC:
        return WriteError("disk full while writing the output", path)
    return WriteError(f"cannot write output: {e.strerror or e}", path)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or (name.endswith(".index.json") and any(s in name for s in WEIGHT_SUFFIXES))


TMP_MARK = ".capmerge-tmp-"
OLD_MARK = ".capmerge-old-"
_OWNER_RE = re.compile(r"(?P<pid>[0-9]{1,10})-(?P<start>[0-9]{1,20})-(?P<boot>[0-9a-f]{8})-[0-9a-f]{8}")
_TMP_ROOM = 1 + len(TMP_MARK) + 10 + 1 + 20 + 1 + 8 + 1 + 8  # the dot and the longest suffix: a fixed room, so
# that every run derives the same stem from the same OUT name


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def sibling_stem(name: str, room: int) -> str:
    """``name`` when it fits in ``room`` bytes (UTF-8), else its longest prefix that fits with ``~`` and 12 hex
    digits of its sha256: the same stem for the same name, different stems for different names."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return name
    tail = "~" + hashlib.sha256(raw).hexdigest()[:12]
    head = raw[: max(0, room - len(tail))].decode("utf-8", "ignore")  # never cut a character in two
    return head + tail


@functools.lru_cache(maxsize=1)
def _boot_tag() -> str:
    """8 hex digits naming this boot of this machine (start times count from boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            ident = f.read().strip()
    except OSError:
        import socket

        ident = socket.gethostname()
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), 0 where /proc is absent, None when
    there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        stat = b""
    if stat:
        try:
            return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22; the command name may hold spaces
        except (ValueError, IndexError):
            return 0
    if os.path.isdir("/proc/self"):
        return None
    try:  # no /proc: a process with that PID is alive (or a PID reused; then the temporary waits)
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return 0


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{_start_time(pid) or 0}-{_boot_tag()}"


def _writer_gone(rest: str) -> bool:
    """Whether the writer named by a temporary's suffix (``pid-start-boot-random``) has ended on this machine."""
    m = _OWNER_RE.fullmatch(rest)
    if m is None or m["boot"] != _boot_tag():  # not ours to judge (another machine, or another boot's PIDs)
        return False
    pid, start = int(m["pid"]), int(m["start"])
    if pid == os.getpid():
        return False
    now = _start_time(pid)
    return now is None or (now != 0 and start != 0 and now != start)


def remove_stale_temporaries(out: Path, keep: tuple[Path, ...] = ()) -> list[str]:
    """Remove the temporaries of OUT (file or directory) left by writers that are gone; returns their names.

    Only names of the exact form this module writes for OUT are considered, and one of a writer still alive (same
    PID and start time, on this boot) is never touched; ``keep`` names paths never to remove (the inputs)."""
    parent = out.parent
    prefix = "." + sibling_stem(out.name, _name_max(parent) - _TMP_ROOM) + TMP_MARK
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return removed
    kept = {os.path.realpath(k) for k in keep}
    for n in names:
        p = parent / n
        if os.path.realpath(p) in kept or not _writer_gone(n[len(prefix) :]):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(n)
    return removed


def temporary_sibling(out: Path) -> Path:
    """A new temporary name next to ``out`` (absolute), naming this process as its writer; it fits the file-name
    limit whatever the length of ``out``'s name."""
    stem = sibling_stem(out.name, _name_max(out.parent) - _TMP_ROOM)
    return out.parent / f".{stem}{TMP_MARK}{_owner_tag()}-{secrets.token_hex(4)}"


def replace_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write a side output (a JSON report, a plot) with ``write(temporary path)``, then rename it over ``path``; on
    any failure (Ctrl-C included) the temporary is removed. Temporaries of ``path`` left by writers that are gone are
    removed first, as for :class:`Output`."""
    target = Path(os.path.abspath(path))
    remove_stale_temporaries(target)
    tmp = temporary_sibling(target)
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class Output:
    """The temporary sibling of OUT, made to appear at OUT atomically by :meth:`commit`.

    Checks up front that OUT is not an input, not inside an input directory, and does not exist unless
    ``force``. On :meth:`abort` (any failure, Ctrl-C) everything written is removed. Temporaries of OUT left by
    earlier writers that are gone (see the module docstring) are removed when the run starts.
    """

    def __init__(self, out: str | os.PathLike[str], inputs: list[Checkpoint], *, force: bool = False) -> None:
        raw = os.fspath(out)
        if not raw:
            raise UsageError("empty output path")
        self.out = Path(os.path.abspath(raw))
        self.single_file = raw.endswith(".safetensors")
        real_out = Path(os.path.realpath(self.out))
        for ck in inputs:
            for f in ck.files:
                rf = Path(os.path.realpath(f))
                if rf == real_out:
                    raise OutputExistsError("output is one of the inputs", raw)
                if real_out in rf.parents:
                    raise OutputExistsError(f"output directory contains the input {f}", raw)
            if ck.root is not None:
                root = Path(os.path.realpath(ck.root))
                if root == real_out or root in real_out.parents:
                    raise OutputExistsError(f"output is inside the input directory {ck.root}", raw)
        self.force = force
        limit = _name_max(_existing_parent(self.out))
        if len(os.fsencode(self.out.name)) > limit:
            raise UsageError(f"output name is {len(os.fsencode(self.out.name))} bytes, longer than the file-name "
                             f"limit ({limit})", raw)  # fmt: skip
        if os.path.lexists(self.out) and not force:
            raise OutputExistsError("output exists; pass --force to replace it", raw)
        self.created_dirs: list[Path] = []
        parent = self.out.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as e:
                self._remove_created_dirs()
                raise _write_error(e, str(d)) from e
            self.created_dirs.append(d)
        keep = tuple(Path(f) for ck in inputs for f in ck.files)
        self.stale_removed = remove_stale_temporaries(self.out, keep)
        self.tmp = temporary_sibling(self.out)
        self.files: list[SafetensorsFile] = []
        self.done = False
        if not self.single_file:
            try:
                self.tmp.mkdir()
            except BaseException as e:  # Ctrl-C included: leave nothing behind
                self._remove_created_dirs()
                if isinstance(e, OSError):
                    raise _write_error(e, str(self.tmp)) from e
                raise

    def path_for(self, relname: str) -> Path:
        """Where a file of the output goes while it is written (the single temp file, or inside the temp dir)."""
        return self.tmp if self.single_file else self.tmp / relname

    def open_file(self, relname: str, planned: list[tuple[str, str, tuple[int, ...]]]) -> SafetensorsFile:
        try:
            f = SafetensorsFile(self.path_for(relname), planned)
        except WriteError as e:  # name OUT, not the hidden temporary (already removed) that the user never sees
            final = self.out if self.single_file else self.out / relname
            raise WriteError(e.what, str(final)) from None
        self.files.append(f)
        return f

    def write_text(self, relname: str, text: str) -> None:
        try:
            self.path_for(relname).write_text(text, encoding="utf-8")
        except OSError as e:
            raise _write_error(e, str(self.out / relname)) from e

    def copy_non_weight_files(self, root: str) -> tuple[list[str], dict[str, str]]:
        """Copy every non-weight file of a checkpoint directory (configs, tokenizer, code, cards...).

        A file that is a symlink leading outside the checkpoint directory (and outside its Hub cache entry, see
        :func:`~capmerge.io.checkpoint.checkpoint_bounds`) is not copied: its content is not the checkpoint's, and an
        output is what ``push`` uploads. Neither is anything that is not a regular file (FIFO, socket, device).

        Returns:
            (the relative paths copied, relative path → why it was skipped).
        """
        copied: list[str] = []
        skipped: dict[str, str] = {}
        src_root = Path(root)
        bounds = checkpoint_bounds(root)
        for src in sorted(src_root.rglob("*")):
            rel = src.relative_to(src_root)
            if any(part.startswith(".") for part in rel.parts) or src.is_dir():
                continue
            if is_weight_file(src.name) or rel.as_posix() == "capmerge.json":
                continue
            why = self.copy_side_file(src_root, rel.as_posix(), bounds)
            if why is None:
                copied.append(rel.as_posix())
            else:
                skipped[rel.as_posix()] = why
        return copied, skipped

    def copy_side_file(self, root: str | os.PathLike[str], rel: str, bounds: list[str] | None = None) -> str | None:
        """Copy ``root/rel`` to ``OUT/rel`` unless it is a symlink leading outside the checkpoint (``bounds``, default
        :func:`~capmerge.io.checkpoint.checkpoint_bounds` of ``root``) or not a regular file; returns why it was
        skipped, or None when it was copied."""
        src = Path(root) / rel
        outside = leads_outside(src, checkpoint_bounds(root) if bounds is None else bounds)
        if outside is not None:
            return f"a symlink leading outside the checkpoint directory (to {outside})"
        if not src.is_file():
            return "not a regular file" if src.exists() else "a broken symlink"
        dst = self.tmp / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        except OSError as e:
            raise _write_error(e, str(self.out / rel)) from e
        return None

    def commit(self) -> None:
        """Move the finished output into place; with ``force`` an existing OUT is replaced."""
        for f in self.files:
            f.close()
        try:
            if os.path.lexists(self.out):
                if not self.force:  # appeared while we were working
                    raise OutputExistsError("output exists; pass --force to replace it", str(self.out))
                if self.single_file and not self.out.is_dir():
                    os.replace(self.tmp, self.out)
                else:
                    _swap_into_place(self.tmp, self.out)
            else:
                os.rename(self.tmp, self.out)
        except OutputExistsError:  # an OSError too, but the message says it all (exit 2, not a write failure)
            raise
        except OSError as e:
            raise _write_error(e, str(self.out)) from e
        self.done = True

    def abort(self) -> None:
        for f in self.files:
            f.close()
        if not self.done:
            with contextlib.suppress(OSError):
                if self.tmp.is_dir() and not self.tmp.is_symlink():
                    shutil.rmtree(self.tmp)
                elif os.path.lexists(self.tmp):
                    self.tmp.unlink()
            self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()


def _swap_into_place(new: Path, old: Path) -> None:
    """Replace ``old`` (a file or directory) by ``new``; atomic where the OS can exchange two paths."""
    if _rename_exchange(new, old):
        _remove_path(new)  # ``new`` now holds the old content
        return
    stem = sibling_stem(old.name, _name_max(old.parent) - 1 - len(OLD_MARK) - 8)  # the dot, the mark, 8 hex
    trash = old.parent / f".{stem}{OLD_MARK}{secrets.token_hex(4)}"
    os.rename(old, trash)
    try:
        os.rename(new, old)
    except OSError:
        os.rename(trash, old)
        raise
    _remove_path(trash)


def _remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _rename_exchange(a: Path, b: Path) -> bool:
    """Linux renameat2(RENAME_EXCHANGE): swaps two paths atomically. Returns False where unavailable."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


VECTOR_NAME = "capvector"  # the stem of a vector's files: capvector.safetensors, capvector-partN.safetensors
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """``5GB`` → 5·10⁹, ``2GiB`` → 2·2³⁰, ``500MB``, plain integers = bytes (as huggingface_hub does)."""
    if isinstance(size, bool):
        raise UsageError(f"invalid size {size!r} (use e.g. 5GB, 500MB, 2GiB)")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise UsageError(f"invalid size {size!r} (use e.g. 5GB, 500MB, 2GiB)")
        scaled = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]  # inf for a numeral too long for a float
        n = int(scaled) if scaled < 2**63 else 2**63
    if n >= 2**63:
        shown = repr(size) if len(str(size)) <= 40 else f"{str(size)[:40]!r}… ({len(str(size))} characters)"
        raise UsageError(f"size too large: {shown} (at most 2**63 - 1 bytes)")
    if n <= 0:
        raise UsageError(f"size must be positive: {size!r}")
    return n


def finish_files(
    out: Output, files: list[tuple[str, SafetensorsFile]], metadata: dict[str, str], index_name: str | None
) -> tuple[list[str], int]:
    """Write headers, then the index when there are several files. Returns (file names, bytes written)."""
    names, written, weight_map, total = [], 0, {}, 0
    for name, f in files:
        for e in f.entries:
            weight_map[e.name] = name
            total += e.end - e.begin
        written += f.finish(metadata)
        names.append(name)
    if index_name is not None:
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
        text = json.dumps(index, indent=2) + "\n"
        out.write_text(index_name, text)
        written += len(text.encode())
        names.append(index_name)
    return names, written
