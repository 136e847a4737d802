"""Block hashes of file ranges (xxh3_128), the one definition both nodes must agree on.

Why a module of its own: the primary hashes its copy and the secondary hashes its own with
exactly this code, and a block's digest is only comparable if both sides cut the blocks and
treat holes the same way. A block that is a hole, all zeros, or beyond the end of the file
hashes to ZERO (16 zero bytes); holes are found with SEEK_DATA/SEEK_HOLE and not read at all.
Blocks are cut from each range's own start: block i of (offset, length) is
[offset + i*bs, min(offset + (i+1)*bs, offset + length)).
"""

from __future__ import annotations

import errno
import os

import xxhash

COARSE = 64 * 1024  # block size compared first
FINE = 4 * 1024  # block size compared inside the coarse blocks that differ
ZERO = bytes(16)  # the digest of a hole / an all-zero block / a block beyond the end
DIGEST = 16
READ_CHUNK = 1024 * 1024
_SMALL = 256 * 1024  # ranges up to this size are read at once (no hole search)
_ZERO_DIGESTS: dict[int, bytes] = {}


def _zero_digest(n: int) -> bytes:
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = _ZERO_DIGESTS[n] = xxhash.xxh3_128_digest(bytes(n))
    return d


def block_count(ranges: list[tuple[int, int]], bs: int) -> int:
    """How many digests hash_ranges returns for these ranges."""
    return sum(-(-n // bs) for _, n in ranges)


def split_digests(digests: bytes) -> list[bytes]:
    return [digests[i:i + DIGEST] for i in range(0, len(digests), DIGEST)]


def _digest(block: memoryview | bytes) -> bytes:
    d = xxhash.xxh3_128_digest(block)
    return ZERO if d == _zero_digest(len(block)) else d


def hash_ranges(fd: int, ranges: list[tuple[int, int]], bs: int, size: int) -> bytes:
    """DIGEST bytes per block of `bs` bytes over each (offset, length) range of the open
    file `fd` whose size is `size`."""
    out = bytearray()
    for off, length in ranges:
        if off < 0 or length < 0:
            raise ValueError(f"bad range ({off}, {length})")
        if length <= _SMALL:
            out += _hash_small(fd, off, length, bs, size)
        else:
            out += _hash_range(fd, off, length, bs, size)
    return bytes(out)


def _hash_small(fd: int, off: int, length: int, bs: int, size: int) -> bytes:
    """A short range: one read (a hole reads as zeros, which hash to ZERO all the same)."""
    data = memoryview(os.pread(fd, max(0, min(length, size - off)), off)) if off < size else b""
    out = bytearray()
    for pos in range(0, length, bs):
        block = data[pos:pos + bs]
        out += _digest(block) if block else ZERO
    return bytes(out)


def _hash_range(fd: int, off: int, length: int, bs: int, size: int) -> bytes:
    out = bytearray()
    end = off + length
    pos = off
    data_start, data_end = pos, pos  # the current data extent [data_start, data_end)
    chunk_off, chunk = -1, memoryview(b"")
    while pos < end:
        blen = min(bs, end - pos)
        if pos >= size:
            out += ZERO
            pos += blen
            continue
        if pos >= data_end:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
                data_end = os.lseek(fd, data_start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data_start = data_end = size
        if pos + blen <= data_start:
            out += ZERO
            pos += blen
            continue
        if not chunk_off <= pos < chunk_off + len(chunk) - blen + 1:
            want = min(READ_CHUNK, end - pos, size - pos)
            chunk_off, chunk = pos, memoryview(os.pread(fd, max(want, blen), pos))
        block = chunk[pos - chunk_off:pos - chunk_off + blen]
        out += _digest(block) if block else ZERO
        pos += blen
    return bytes(out)
