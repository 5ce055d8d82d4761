"""THE streaming loop: for each output tensor, read its inputs block by block, compute, write.

Three stages overlap, each in its own thread, connected by bounded queues over a fixed pool of buffers:

    reader thread  --(input slots)-->  compute (caller's thread)  --(output blocks)-->  writer thread

* the reader fills input slots with ``preadv`` (a copy out of the page cache, GIL released);
* compute runs one block kernel (:mod:`capmerge.merge.compute`, GIL released) into an output block;
* the writer ``pwrite``\\ s blocks at their final offsets; tensors copied through unchanged go from file to file
  with ``copy_file_range`` (no user-space copy at all).

Memory is the buffer pool — ``depth × (inputs + 1) × block`` bytes — whatever the model's depth or width:
a 2 GB embedding matrix streams through the same few megabytes as a bias vector.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import functools
import gc
import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from capmerge import _interrupts
from capmerge.errors import CapmergeError, NonFiniteError, WriteError
from capmerge.io.checkpoint import DTYPES, Checkpoint, TensorInfo
from capmerge.io.lazy import BLOCK_ELEMS  # elements per block on the CPU (one constant for the engine and lazy views)
from capmerge.io.writer import DIRECT_ALIGN, SafetensorsFile, WritePaths, _write_error
from capmerge.merge import compute

GPU_BLOCK_ELEMS = 1 << 21  # elements per block when a GPU computes: fewer, larger host <-> device transfers
DEPTH = 3  # buffers per stage
SPLIT_MIN = 1 << 16  # blocks at least this long are computed in parts, one per compute thread
SPLIT_ALIGN = 4096  # part boundaries, in elements
MAP_PREPARE = True  # prepare passes read mapped files where they can (False: copies into scratch buffers)
MAP_READS = True  # so does the merge pass on the CPU (False: copies into the pool's buffers)
_STATS_THREADS = "capmerge-stats"  # the name of parallel_map's threads
PREPARE_AHEAD = 2  # jobs whose prepare pass may be done before the reader reaches them
PREPARERS = 2  # threads running prepare passes: one's serial steps (a sample's ranks) overlap the other's pass


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], *, parallel: bool = True) -> list[Any]:
    """``[fn(x) for x in items]``, on up to :func:`compute_threads` threads when ``parallel`` (the native kernels
    release the GIL): a statistics pass beside the merge uses the cores the merge leaves idle. Callers make their
    result independent of the thread count (per-item results combined in order)."""
    workers = min(compute_threads(), len(items)) if parallel else 1
    if workers <= 1 or threading.current_thread().name.startswith(_STATS_THREADS):  # on a pool thread: no nesting
        return [fn(x) for x in items]

    def one(x: Any) -> Any:  # items not begun when a signal arrives are skipped (see capmerge._interrupts)
        if _interrupts.pending():
            raise KeyboardInterrupt
        return fn(x)

    with _interrupts.deferred():
        pool = _stats_pool(compute_threads(), os.getpid())
        futures = [pool.submit(one, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:  # on an error, nothing of this call runs on after it returns
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)


@functools.cache
def _stats_pool(workers: int, pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """The statistics passes' threads, made once per process (``pid``: a forked child makes its own) and kept: a pass
    on new threads each time spread its buffers over ever more of malloc's per-thread arenas, and a 16-layer run held
    more memory than a 4-layer one."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=_STATS_THREADS)


@contextlib.contextmanager
def _objects_frozen() -> Iterator[None]:
    """The objects alive when a run starts (torch's modules, the plan) kept out of the garbage collector's passes
    while it runs (``gc.freeze``): the blocks' short-lived objects set off collections that would walk them all
    (a tenth of a run's CPU time). Where the caller froze objects itself, its freeze is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def compute_threads(reserved: int = 0) -> int:
    """Threads that compute one block on the CPU: ``CAPMERGE_THREADS``, else the usable cores (at most 4) less
    ``reserved`` (cores kept for a pass that runs beside the compute, e.g. the pruning thresholds), at least 1.

    The block kernels are elementwise (DARE masks depend on the element index, passed as the part's offset), so a
    block split into parts gives the same bytes as one call; the kernels release the GIL."""
    env = os.environ.get("CAPMERGE_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise CapmergeError(f"CAPMERGE_THREADS must be a positive integer, got {env!r}") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4) - reserved)


Kernel = Callable[[list[memoryview], list[memoryview], int, int], int]
"""kernel(input views, output views (one per sink), n elements, element offset in the tensor) -> flags"""
Prepare = Callable[[Callable[[int, int, int], memoryview]], None]
"""prepare(read) runs once per tensor before its blocks (e.g. to find pruning thresholds); read(input, start, end)
returns the elements [start, end) of one input in a scratch buffer (valid until the next call)."""


def _aligned_buffer(n: int) -> mmap.mmap:
    """A writable buffer of ``n`` bytes at a page-aligned address (anonymous memory, as a bytearray's)."""
    return mmap.mmap(-1, n)


@dataclass
class Job:
    """One output tensor, written to every sink.

    ``op`` is ``copy`` (the bytes of ``inputs[0]`` verbatim) or ``compute`` (``kernel`` over blocks of the inputs).
    ``drop_zero`` leaves the tensor out when every output element is zero. ``sink`` picks the file within a sink.
    """

    name: str
    op: str
    out_dtype: str
    shape: tuple[int, ...]
    inputs: list[tuple[Checkpoint, TensorInfo]]
    kernel: Kernel | None = None
    prepare: Prepare | None = None
    drop_zero: bool = False
    sink: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * DTYPES[self.out_dtype][0]

    @property
    def read_nbytes(self) -> int:
        """Bytes this job reads from its inputs, each once: what the progress bar and the summary's "read" count."""
        return sum(stored_nbytes(ck, info) for ck, info in (self.inputs[:1] if self.op == "copy" else self.inputs))


def stored_nbytes(ck: Checkpoint, info: TensorInfo) -> int:
    """Bytes of tensor ``info`` as ``ck`` stores it: the factors of a low-rank tensor, the kept entries of a sparse one
    (a compressed vector or a LoRA adapter is read as its factors, not as the dense view built from them)."""
    stored = (getattr(ck, "storages", None) or {}).get(info.name)
    return int(stored["nbytes"]) if stored and "nbytes" in stored else info.nbytes


def read_total(jobs: list[Job]) -> int:
    """Bytes ``run(jobs, ...)`` reports as read (``RunStats.bytes_read``), known before it starts."""
    return sum(j.read_nbytes for j in jobs)


class Sink:
    """Decides which file each output tensor goes to. The default: a fixed list of files."""

    def __init__(self, files: list[SafetensorsFile]) -> None:
        self.files = files

    def file_for(self, job: Job) -> SafetensorsFile:
        return self.files[job.sink]


@dataclass
class RunStats:
    tensors_written: int = 0
    tensors_copied: int = 0
    tensors_computed: int = 0
    tensors_dropped: list[str] = field(default_factory=list)
    bytes_read: int = 0  # each input tensor once, as stored (see Job.read_nbytes); equals read_total(jobs)
    bytes_reread: int = 0  # read again by prepare passes (pruning thresholds), on top of bytes_read
    seconds: float = 0.0


class _Abort(Exception):
    pass


class _Pipeline:
    def __init__(
        self,
        jobs: list[Job],
        sinks: list[Sink],
        *,
        allow_nonfinite: bool,
        progress: Callable[[int, int], None],
        device: str = "cpu",
    ):
        self.jobs = jobs
        self.device = device
        self.sinks = sinks
        self.allow_nonfinite = allow_nonfinite
        self.progress = progress
        self.abort = threading.Event()
        self.errors: list[BaseException] = []
        computed = [j for j in jobs if j.op != "copy"]
        n_in = max((len(j.inputs) for j in computed), default=1)
        in_item = max((info.itemsize for j in computed for _, info in j.inputs), default=4)
        out_item = max((DTYPES[j.out_dtype][0] for j in computed), default=4)
        biggest = max((j.numel for j in computed), default=0)
        # on the CPU, blocks small enough that what the reader copies in is still in cache when compute reads it
        # (ties over 3 vectors, 0.95 B bf16: 2.35 s with 512 Ki elements vs 3.13 s with 2 Mi, same run)
        self.block = max(1, min(BLOCK_ELEMS if device == "cpu" else GPU_BLOCK_ELEMS, biggest))
        self.free_slots: queue.Queue[list[bytearray]] = queue.Queue()
        self.free_out: queue.Queue[bytearray | mmap.mmap] = queue.Queue()
        alloc = out_alloc = bytearray
        self.aligned_out = device == "cpu"  # output buffers page-aligned, with DIRECT_ALIGN bytes of room
        self._paths = WritePaths()  # O_DIRECT or the page cache, write by write
        if self.aligned_out:
            out_alloc = _aligned_buffer
        if device != "cpu" and computed:  # page-locked buffers: host <-> GPU copies run asynchronously
            from capmerge.kernels.dispatch import host_buffer

            alloc = out_alloc = functools.partial(host_buffer, device=device)
        if computed:
            for _ in range(DEPTH):
                self.free_slots.put([alloc(self.block * in_item) for _ in range(n_in)])
                for _ in sinks:
                    self.free_out.put(out_alloc(self.block * out_item + DIRECT_ALIGN * self.aligned_out))
        self._tls = threading.local()  # scratch buffers of the thread running a prepare pass
        self._prepare_bytes = 0  # added to by the reader and the preparers
        self._count_lock = threading.Lock()
        # prepare passes (pruning thresholds) run on their own threads, up to PREPARE_AHEAD jobs ahead of the
        # reader, so that the threshold pass of the next tensors overlaps the merge of this one
        # (lazy inputs — LoRA products, pickles — build a tensor per thread, so their jobs prepare on the reader)
        self.prepared = {
            ji: threading.Event()
            for ji, j in enumerate(jobs)
            if j.op != "copy" and j.prepare and all(getattr(ck, "direct", False) for ck, _ in j.inputs)
        }
        self.prepare_slots = threading.Semaphore(PREPARE_AHEAD)
        self._to_prepare = iter(list(self.prepared))  # job indices, taken in order by the preparer threads
        self._prepare_lock = threading.Lock()
        self._preparers_left = PREPARERS
        self.map_reads = MAP_READS and device == "cpu"  # the merge pass reads mapped files (else the pool's buffers)
        self._prepared_maps: dict[int, dict[int, Any]] = {}  # id(job) -> the maps of its prepare pass, for its merge
        # the threshold pass keeps one core busy: on 2 cores, splitting the merge as well was slower (2.40 vs 2.31 s)
        self.parts = compute_threads(1 if self.prepared else 0) if device == "cpu" and computed else 1
        # once every prepare pass is done (the last tensors' merges), the merge takes every core
        self.parts_after = compute_threads() if device == "cpu" and computed else 1
        self.prepared_all = threading.Event()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.to_compute: queue.Queue[tuple | None] = queue.Queue(maxsize=2 * DEPTH)
        self.to_write: queue.Queue[tuple | None] = queue.Queue(maxsize=4 * DEPTH)
        self.stats = RunStats()
        self._zero: bytes | None = None

    # -- helpers -------------------------------------------------------------------------------------------------
    def _get(self, q: queue.Queue):  # type: ignore[type-arg]
        while True:
            if self._stopping():  # checked before each item too: a full queue never times out
                raise _Abort
            with contextlib.suppress(queue.Empty):
                return q.get(timeout=0.05)

    def _put(self, q: queue.Queue, item: object) -> None:  # type: ignore[type-arg]
        while True:
            if self._stopping():
                raise _Abort
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=0.05)
                return

    def _stopping(self) -> bool:
        """Whether the stages should stop: one failed, or a signal arrived (see :mod:`capmerge._interrupts`)."""
        return self.abort.is_set() or _interrupts.pending()

    def _fail(self, e: BaseException) -> None:
        self.errors.append(e)
        self.abort.set()

    def _until(self, ready: Callable[[float], bool]) -> None:
        """Poll ``ready(timeout)`` until it is true; leave with _Abort once another stage failed or a signal came."""
        while not ready(0.05):
            if self._stopping():
                raise _Abort

    def _stage(self, body: Callable[[], None]) -> threading.Thread:
        """A daemon thread running one stage; its error (not an abort) is handed to the caller's thread."""

        def run() -> None:
            try:
                body()
            except _Abort:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._fail(e)

        return threading.Thread(target=run, daemon=True)

    # -- stage 1: reader -----------------------------------------------------------------------------------------
    def reader(self) -> None:
        for ji, job in enumerate(self.jobs):
            if job.op == "copy":
                self._put(self.to_compute, ("copy", ji))
                continue
            n = job.numel
            if ji in self.prepared:
                self._until(self.prepared[ji].wait)
                self.prepare_slots.release()
            elif job.prepare is not None:
                self._prepare(job)
            starts = range(0, n, self.block) if n else [0]
            maps = self._prepared_maps.pop(id(job), {}) if self.map_reads else None
            for s in starts:
                e = min(n, s + self.block)
                slot = self._get(self.free_slots)
                views = []
                overflow = False  # a lazy input (B·A, sparse entries) built NaN/Inf from finite stored parts
                for k, (ck, info) in enumerate(job.inputs):
                    m = self._map(maps, k, ck, info) if maps is not None else None
                    if m is not None:  # a view of the mapped file (it stays mapped while a view lives)
                        mv = m.view(s * info.itemsize, e * info.itemsize)
                    else:
                        mv = memoryview(slot[k])[: (e - s) * info.itemsize]
                        ck.read_into(info, s * info.itemsize, mv)
                    views.append(mv)
                    overflow = overflow or info.name in getattr(ck, "overflowed", ())
                self._put(self.to_compute, ("block", ji, s, e, slot, views, overflow))
        self._put(self.to_compute, None)

    def preparer(self) -> None:
        """Stage 0, on PREPARERS threads: the prepare passes, begun in job order, at most PREPARE_AHEAD ahead of the
        reader (two at once: the serial steps of one, e.g. ranking a sample, overlap the other's pass)."""
        while True:
            self._until(lambda t: self.prepare_slots.acquire(timeout=t))
            with self._prepare_lock:
                ji = next(self._to_prepare, None)
            if ji is None:
                self.prepare_slots.release()
                break
            self._prepare(self.jobs[ji])
            self.prepared[ji].set()
        with self._prepare_lock:
            self._preparers_left -= 1
            if not self._preparers_left:
                self.prepared_all.set()

    @staticmethod
    def _map(maps: dict[int, Any], k: int, ck: Checkpoint, info: TensorInfo) -> Any:
        """Input k's tensor mapped from its file (:meth:`Checkpoint.map_tensor`), once per job; None: read it."""
        if k not in maps:
            mapper = getattr(ck, "map_tensor", None)
            maps[k] = mapper(info) if mapper is not None else None
        return maps[k]

    def _prepare(self, job: Job) -> None:
        """Run ``job``'s prepare pass. Its reads are views of the inputs' files mapped into memory where an input
        can be (:meth:`Checkpoint.map_tensor`: no copy; a statistics pass reads each input once or twice before
        the merge reads it again), else copies into a scratch buffer; once the pass is done its maps go to the job's
        merge pass (the pages it faulted in stay mapped: the merge does not fault them in again)."""
        assert job.prepare is not None
        maps: dict[int, Any] = {}
        done = False
        try:
            job.prepare(functools.partial(self._read_prepare, job, maps if MAP_PREPARE else None))
            done = True
        finally:
            if done and self.map_reads:
                self._prepared_maps[id(job)] = maps  # the merge pass reads through them (no second page faults)
            else:
                for m in maps.values():
                    if m is not None:
                        m.close()

    def _read_prepare(self, job: Job, maps: dict[int, Any] | None, i: int, start: int, end: int) -> memoryview:
        """Elements [start, end) of input i of ``job``: a view of its mapped file (``maps``, see :meth:`_prepare`)
        or a copy in a scratch buffer (for prepare passes, reader or preparer thread)."""
        if self._stopping():
            raise _Abort
        ck, info = job.inputs[i]
        if maps is not None and self._map(maps, i, ck, info) is not None:
            with self._count_lock:
                self._prepare_bytes += (end - start) * info.itemsize
            return maps[i].view(start * info.itemsize, end * info.itemsize)
        need = (end - start) * info.itemsize
        scratch: dict[int, bytearray] = self._tls.__dict__.setdefault("scratch", {})
        buf = scratch.get(i)
        if buf is None or len(buf) < need:
            buf = scratch[i] = bytearray(max(need, self.block * info.itemsize))
        mv = memoryview(buf)[:need]
        ck.read_into(info, start * info.itemsize, mv)
        with self._count_lock:
            self._prepare_bytes += need
        return mv

    # -- stage 3: writer -----------------------------------------------------------------------------------------
    def writer(self) -> None:
        while True:
            item = self._get(self.to_write)
            if item is None:
                return
            kind = item[0]
            if kind == "write":
                _, f, offset, buf, shift, nbytes = item
                self._pwrite(f, memoryview(buf)[shift : shift + nbytes], offset)
                self.free_out.put(buf)
            elif kind == "zero":
                _, f, offset, nbytes = item
                if self._zero is None:
                    self._zero = bytes(1 << 20)
                while nbytes:
                    k = min(nbytes, len(self._zero))
                    self._pwrite(f, memoryview(self._zero)[:k], offset)
                    offset += k
                    nbytes -= k
            else:  # copy
                _, f, offset, ck, info = item
                self._copy(f, offset, ck, info)

    def _pwrite(self, f: SafetensorsFile, view: memoryview, offset: int) -> None:
        """Every write of the writer: by O_DIRECT or the page cache as :class:`WritePaths` chooses, where the file
        can take either and the write is long enough to have whole blocks."""
        if not f.takes_direct(len(view)):
            f.write_at(view, offset)
            return
        direct = self._paths.choose()
        t = time.perf_counter()
        f.write_at(view, offset, direct=direct)
        self._paths.record(direct, len(view), time.perf_counter() - t)

    def _copy(self, f: SafetensorsFile, offset: int, ck: Checkpoint, info: TensorInfo) -> None:
        use_cfr = hasattr(os, "copy_file_range") and ck.direct  # lazy views copy through read_into
        src = ck.fd(info.shard) if ck.direct else -1
        done = 0
        while done < info.nbytes:
            if use_cfr:
                try:
                    n = os.copy_file_range(src, f.fd, info.nbytes - done, info.start + done, offset + done)
                except OSError as e:
                    if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                        use_cfr = False
                        continue
                    raise _write_error(e, f.path) from e
                if n == 0:
                    raise CapmergeError(f"unexpected end of file while copying tensor {info.name}", info.shard)
                done += n
            else:
                buf = bytearray(min(8 << 20, info.nbytes - done))
                ck.read_into(info, done, memoryview(buf))
                self._pwrite(f, memoryview(buf), offset + done)
                done += len(buf)

    # -- stage 2: compute (caller's thread) ------------------------------------------------------------------------
    def run(self) -> RunStats:
        with _interrupts.deferred(), _objects_frozen():
            return self._run()

    def _run(self) -> RunStats:
        t0 = time.perf_counter()
        threads = [self._stage(self.reader), self._stage(self.writer)]
        if self.prepared:
            threads += [self._stage(self.preparer) for _ in range(PREPARERS)]
        for t in threads:
            t.start()
        if self.parts_after > 1:
            self.pool = concurrent.futures.ThreadPoolExecutor(
                self.parts_after - 1, thread_name_prefix="capmerge-compute"
            )
        try:
            self._compute_loop()
            self._put(self.to_write, None)
            threads[1].join()
        except BaseException as e:
            if not isinstance(e, _Abort):
                self.errors.insert(0, e)
            self.abort.set()
        finally:
            self.abort.set()
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            for t in threads:
                t.join()
        if self.errors:
            raise self.errors[0]
        self.stats.bytes_reread += self._prepare_bytes
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _kernel(self, job: Job, views: list[memoryview], outs: list[memoryview], n: int, offset: int) -> int:
        """``job.kernel`` over one block: in parts on the compute threads when the block is long enough."""
        assert job.kernel is not None
        parts = self.parts_after if self.prepared_all.is_set() else self.parts  # equal without prepare passes
        if self.pool is None or parts <= 1 or n < SPLIT_MIN:
            return job.kernel(views, outs, n, offset)
        step = -(-n // parts)
        step = -(-step // SPLIT_ALIGN) * SPLIT_ALIGN
        isz = [info.itemsize for _, info in job.inputs]
        osz = DTYPES[job.out_dtype][0]
        kernel = job.kernel

        def part(lo: int, hi: int) -> int:
            ins = [v[lo * z : hi * z] for v, z in zip(views, isz, strict=True)]
            return kernel(ins, [o[lo * osz : hi * osz] for o in outs], hi - lo, offset + lo)

        bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
        futures = [self.pool.submit(part, lo, hi) for lo, hi in bounds[1:]]
        flags = 0
        try:
            flags = part(*bounds[0])
        finally:
            for f in futures:
                flags |= f.result()
        return flags

    def _compute_loop(self) -> None:
        st = self.stats
        cur = -1
        offsets: list[int] = []
        files: list[SafetensorsFile] = []
        seen_nonzero = False
        skipped = 0
        done_bytes = job_start = 0
        while True:
            item = self._get(self.to_compute)
            if item is None:
                return
            if item[0] == "copy":
                job = self.jobs[item[1]]
                ck, info = job.inputs[0]
                for sink in self.sinks:
                    f = sink.file_for(job)
                    off = f.place(job.name, job.out_dtype, job.shape, info.nbytes)
                    self._put(self.to_write, ("copy", f, off, ck, info))
                st.tensors_copied += 1
                st.tensors_written += 1
                done_bytes += job.read_nbytes
                st.bytes_read = done_bytes
                self.progress(done_bytes, 1)
                continue
            _, ji, s, e, slot, views, overflow = item
            job = self.jobs[ji]
            if ji != cur:
                cur = ji
                job_start = done_bytes
                files = [sink.file_for(job) for sink in self.sinks]
                offsets = [f.place(job.name, job.out_dtype, job.shape, job.out_nbytes) for f in files]
                seen_nonzero = False
                skipped = 0
            n = e - s
            osize = DTYPES[job.out_dtype][0]
            nbytes = n * osize
            outs = [self._get(self.free_out) for _ in self.sinks]
            # a block lands in its page-aligned buffer as it lands in its file, modulo DIRECT_ALIGN: the file's
            # O_DIRECT writes then take it in place (no copy)
            shifts = [(off + s * osize) % DIRECT_ALIGN if self.aligned_out else 0 for off in offsets]
            shifts = [sh if sh % osize == 0 else 0 for sh in shifts]  # elements stay aligned (else: staged)
            assert job.kernel is not None
            flags = self._kernel(
                job, views, [memoryview(o)[sh : sh + nbytes] for o, sh in zip(outs, shifts, strict=True)], n, s
            )
            self.free_slots.put(slot)
            if (flags & compute.OVERFLOW or overflow) and not self.allow_nonfinite:
                raise NonFiniteError(
                    "result has NaN/Inf where the inputs were finite (overflow in the output dtype?); "
                    "use --allow-nonfinite to keep it",
                    job.name,
                )
            if job.drop_zero and not seen_nonzero and not flags & compute.NONZERO:
                skipped += nbytes  # all-zero prefix: written only if something non-zero follows
                for o in outs:
                    self.free_out.put(o)
            else:
                for f, off, o, sh in zip(files, offsets, outs, shifts, strict=True):
                    if skipped and not seen_nonzero:
                        self._put(self.to_write, ("zero", f, off, skipped))
                    self._put(self.to_write, ("write", f, off + s * osize, o, sh, nbytes))
                seen_nonzero = True
            # the job's stored bytes, spread over its blocks (a low-rank input is read as its factors)
            done_bytes = job_start + (job.read_nbytes * e // job.numel if job.numel else job.read_nbytes)
            st.bytes_read = done_bytes
            last = e >= job.numel
            if last:
                st.tensors_computed += 1
                if job.drop_zero and not seen_nonzero:
                    for f in files:
                        f.discard_last()
                    st.tensors_dropped.append(job.name)
                else:
                    st.tensors_written += 1
            self.progress(done_bytes, 1 if last else 0)


def run(
    jobs: list[Job],
    sink: Sink | list[Sink],
    *,
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
) -> RunStats:
    """Stream ``jobs`` into the files of ``sink`` (or of every sink of a list: one output per sink, e.g. an α sweep).

    ``device`` (resolved, see :func:`capmerge.kernels.device.resolve_device`) only picks the kind of block buffers;
    the jobs' kernels carry their own device. Raises the first error of any stage; the caller cleans up the outputs.
    """
    sinks = sink if isinstance(sink, list) else [sink]
    pipe = _Pipeline(
        jobs, sinks, allow_nonfinite=allow_nonfinite, progress=progress or (lambda b, t: None), device=device
    )
    try:
        return pipe.run()
    except KeyboardInterrupt:
        raise
    except OSError as e:
        if isinstance(e, CapmergeError):
            raise
        raise WriteError(f"I/O error: {e.strerror or e}", getattr(e, "filename", None)) from e
