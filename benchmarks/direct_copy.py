"""Concatenate files into one, written with O_DIRECT: the I/O floor's third plain copy (bench_apply.floor_cmd).

Run:
    python benchmarks/direct_copy.py OUT FILE...

capmerge writes its output's whole aligned blocks with O_DIRECT (docs/architecture.md, "The streaming writer"), so
the floor takes the faster of copies through the page cache (``cat``, ``dd``) and this one: 8 MB pieces read into
a page-aligned buffer and written with O_DIRECT at offsets that are multiples of 8 MB, the last piece through the page
cache.
"""

from __future__ import annotations

import mmap
import os
import sys

CHUNK = 8 << 20


def write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def main(argv: list[str]) -> int:
    out, sources = argv[0], argv[1:]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    dfd = os.open(out, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned
    view = memoryview(buf)
    fill = pos = 0
    for src in sources:
        with open(src, "rb", buffering=0) as fh:
            while n := fh.readinto(view[fill:]):
                fill += n
                if fill == CHUNK:
                    write_all(dfd, view, pos)
                    pos, fill = pos + CHUNK, 0
    write_all(fd, view[:fill], pos)
    view.release()
    os.close(dfd)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
