"""Fast, exact Label Studio brush RLE (the ``@thi.ng/rle-pack`` bit format) in pure numpy.

Label Studio stores a brush mask as the byte list of an RLE bit stream over the *flattened
RGBA image* of the mask (H*W*4 values, row-major, the mask value repeated in all 4 channels).
The stream, read MSB first:

* header (53 bits): ``num`` values (32 bits), ``word_size - 1`` (5 bits), and four run-size
  widths ``rle_sizes[t] - 1`` (4 bits each);
* blocks until ``num`` values are produced: flag (1 bit), size index ``t`` (2 bits),
  ``count - 1`` (``rle_sizes[t]`` bits), then one word (flag 1: ``count`` copies of it) or
  ``count`` words (flag 0: a literal block).

``mask_to_rle`` reproduces ``label_studio_sdk.converter.brush.mask2rle`` bit for bit, quirks
included: a run of 1 is a literal block, a run longer than 256 always uses the 16-bit size and
is split into blocks of 65 536 values, and the stream is padded with 1-8 zero bits (so a whole
extra zero byte when it already ends on a byte boundary). ``rle_to_mask`` decodes any valid
stream (word size <= 8, any run sizes, literal blocks of any length as the LS frontend writes).

Neither loops over values in Python: encoding scatters variable-length codes into 32-bit words
with ``bincount``; decoding precomputes, for every bit offset, where the next block would start
if one started there, and follows that chain from the header at C speed (one step per block).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from functools import lru_cache
from itertools import chain, repeat
from operator import getitem

import numpy as np

__all__ = ["mask_to_rle", "rle_to_mask"]

_HEADER_BITS = 53
_WORD_SIZE = 8
_RLE_SIZES = (3, 4, 8, 16)
_BLOCK_MAX = 1 << 16  # values in one block with a 16-bit size field
_INT32_MAX_BITS = (1 << 30) - (1 << 16)  # longer streams index their bits with int64
# Second header field: word_size - 1 (5 bits) then rle_sizes - 1 (4 bits each) = 21 bits.
_HEADER_TAIL = ((_WORD_SIZE - 1) << 16) | sum((s - 1) << (12 - 4 * k) for k, s in enumerate(_RLE_SIZES))


def mask_to_rle(mask: np.ndarray, *, binarize: bool = True) -> list[int]:
    """Encode a 2-D mask as Label Studio brush RLE, byte-identical to SDK ``mask2rle``.

    With ``binarize`` (default) every nonzero pixel is written as 255: LS brushes are 0/255,
    while ``mask2rle`` stores values verbatim, so a 0/1 mask there becomes an invisible brush
    (alpha 1). ``binarize=False`` keeps raw values in 0..255, exactly as ``mask2rle`` does.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
        raise ValueError(f"mask dtype must be bool or integer, got {mask.dtype}")
    flat = mask.reshape(-1)
    if flat.size == 0:
        return _pack(np.zeros(0, np.int64), np.zeros(0, np.uint8), 0)
    if binarize or flat.dtype == np.bool_:
        flat = flat.view(np.uint8) if flat.dtype == np.bool_ else flat != 0
        scale = 255
    else:
        if flat.min() < 0 or flat.max() > 255:
            raise ValueError("mask values must lie in 0..255 when binarize=False")
        scale = 1
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    values = flat[np.concatenate(([0], starts))].astype(np.uint8)
    if scale != 1:
        values *= np.uint8(scale)
    lengths = np.diff(np.concatenate(([0], starts, [flat.size]))) * 4  # 4 RGBA values / pixel
    return _pack(lengths, values, 4 * flat.size)


def _pack(lengths: np.ndarray, values: np.ndarray, num: int) -> list[int]:
    """Bit-pack runs the way the SDK's ``encode_rle`` does (word size 8, run sizes 3/4/8/16)."""
    long = lengths > 256
    if long.any():  # ceil(L / 65536) blocks: full ones of 65536 values, then the remainder
        nblk = np.where(long, (lengths - 1) // _BLOCK_MAX + 1, 1)
        split = np.full(int(nblk.sum()), _BLOCK_MAX, np.int64)
        split[np.cumsum(nblk) - 1] = lengths - (nblk - 1) * _BLOCK_MAX
        values, long, lengths = np.repeat(values, nblk), np.repeat(long, nblk), split
    # size index t: 0 for <= 8, 1 for <= 16, 2 for <= 256, 3 for anything split from > 256
    t = np.where(long, 3, (lengths > 8).astype(np.int64) + (lengths > 16))
    size_bits = np.array(_RLE_SIZES, np.int64)[t]
    flag = (lengths > 1).astype(np.int64)  # a run of one is a literal block of one word
    codes = (((flag << 2 | t) << size_bits | (lengths - 1)) << _WORD_SIZE) | values
    nbits = 3 + size_bits + _WORD_SIZE
    codes = np.concatenate(([num, _HEADER_TAIL], codes))
    nbits = np.concatenate(([32, 21], nbits))
    offsets = np.cumsum(nbits) - nbits
    total = int(offsets[-1] + nbits[-1])
    nbytes = total // 8 + 1  # the SDK always pads 1..8 zero bits
    # Place each code (<= 32 bits) into the 64-bit window over words k, k+1 (big-endian bits).
    # Codes never overlap, so summing their parts per word equals OR-ing them; float64 sums of
    # disjoint bit fields below 2**32 are exact.
    word, shift = offsets >> 5, offsets & 31
    placed = codes.astype(np.uint64) << (64 - shift - nbits).astype(np.uint64)
    nwords = (nbytes + 3) // 4 + 1
    hi = np.bincount(word, (placed >> np.uint64(32)).astype(np.float64), nwords)
    lo = np.bincount(word + 1, (placed & np.uint64(0xFFFFFFFF)).astype(np.float64), nwords)
    words = (hi + lo).astype(np.uint32).astype(">u4")
    return list(words.tobytes()[:nbytes])


def rle_to_mask(rle: Sequence[int] | np.ndarray | bytes, height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to the (height, width) uint8 alpha channel.

    Equals ``decode_rle(rle).reshape(height, width, 4)[..., 3]``; raises ``ValueError`` for
    malformed input (bad bytes, truncated stream, size mismatch). As in the reference JS decoder,
    a last block running past ``num`` values is clipped and trailing bits are ignored.
    """
    buf = _as_bytes(rle)
    nbytes = len(buf)
    if nbytes * 8 < _HEADER_BITS:
        raise ValueError(f"RLE too short for its 53-bit header: {nbytes} bytes")
    num = int.from_bytes(buf[:4], "big")
    tail = int.from_bytes(buf[4:7], "big") >> 3
    word_size = (tail >> 16) + 1
    rle_sizes = tuple(((tail >> (12 - 4 * k)) & 15) + 1 for k in range(4))
    if height < 0 or width < 0 or num != 4 * height * width:
        raise ValueError(
            f"RLE holds {num} values but a {height}x{width} RGBA mask needs {4 * height * width}"
        )
    if word_size > 8:
        raise ValueError(f"RLE word size {word_size} > 8 bits cannot hold uint8 mask values")
    if num == 0:
        return np.zeros((height, width), np.uint8)

    # 32-bit big-endian window starting at every byte (zero padded past the end).
    padded = np.frombuffer(buf + b"\0\0\0\0", np.uint8)
    window = np.ndarray((nbytes,), ">u4", padded, 0, (1,)).astype(np.int64)
    starts, end = _block_starts(window, word_size, rle_sizes)
    if starts.size == 0:
        raise ValueError("RLE truncated: no block after the header")

    # Decode the header of every block.
    full_bits = 3 + max(rle_sizes)
    head = ((window[starts >> 3] << (starts & 7)) >> (32 - full_bits)) & ((1 << full_bits) - 1)
    is_run = head >> (full_bits - 1) == 1
    size_bits = np.array(rle_sizes, np.int64)[(head >> (full_bits - 3)) & 3]
    count = ((head >> (full_bits - 3 - size_bits)) & ((1 << size_bits) - 1)) + 1
    done = np.cumsum(count)
    if done[-1] < num:
        raise ValueError(f"RLE truncated: blocks give {int(done[-1])} of {num} values")
    nblocks = int(np.searchsorted(done, num)) + 1
    last_end = starts[nblocks] if nblocks < starts.size else end
    if last_end > 8 * nbytes:
        raise ValueError("RLE truncated: last block runs past the end of the data")
    starts, is_run, count = starts[:nblocks], is_run[:nblocks], count[:nblocks]
    word_pos = starts + 3 + size_bits[:nblocks]
    seg_len = count
    literal = ~is_run & (count > 1)
    if literal.any():  # one segment per literal word
        nseg = np.where(is_run, 1, count)
        block = np.repeat(np.arange(nblocks), nseg)
        first = np.cumsum(nseg) - nseg
        k = np.arange(block.size) - first[block]
        word_pos = word_pos[block] + k * word_size
        seg_len = np.where(is_run, count, 1)[block]
    word = (window[word_pos >> 3] << (word_pos & 7)) >> (32 - word_size)
    values = (word & ((1 << word_size) - 1)).astype(np.uint8)
    # Alpha is every 4th value (flat index 4k+3): segment [s, e) holds pixels s//4 .. e//4 - 1.
    ends = np.minimum(np.cumsum(seg_len), num) >> 2
    npix = np.diff(ends, prepend=0)
    return np.repeat(values, npix).reshape(height, width)


def _block_starts(window: np.ndarray, word_size: int, rle_sizes: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """Bit offsets of the blocks after the header, and where the last one ends.

    Blocks have data-dependent lengths, so finding them is inherently sequential. The sequential
    part is kept to one C-level step per block: for every bit offset ``p`` (stored at index
    ``f = (p % 8) * nbytes + p // 8``, which keeps the table build contiguous) we precompute the
    index of the block that would follow if a block started at ``p``, then follow that chain.
    """
    nbytes = window.size
    nbits = 8 * nbytes
    key_bits, lengths = _block_lengths(word_size, rle_sizes)
    dtype, big = (np.int32, 1 << 30) if nbits < _INT32_MAX_BITS else (np.int64, 1 << 62)
    # step[r, key]: next index minus i for a block at p = 8i + r; ``big + f`` marks a literal
    # block too long for the table, handled below in Python.
    shift = np.arange(8)[:, None]
    advance = shift + lengths
    step = np.where(lengths >= 0, (advance & 7) * nbytes + (advance >> 3), big + shift * nbytes).astype(dtype)
    keys = np.empty(nbytes, np.int64)
    col = np.arange(nbytes, dtype=dtype)
    nxt = np.empty((8, nbytes), dtype)
    for r in range(8):
        np.right_shift(window, 32 - key_bits - r, out=keys)
        keys &= (1 << key_bits) - 1
        np.take(step[r], keys, out=nxt[r], mode="clip")  # keys are in range; clip is fastest
        nxt[r] += col
    # Near the end a block may finish at or past the last bit: store that bit offset instead,
    # which is out of range (>= nbits) and so ends the walk.
    lo = max(0, nbytes - int(lengths.max()) // 8 - 2)
    pos = 8 * np.arange(lo, nbytes) + shift
    tail_len = lengths[(window[lo:] >> (32 - key_bits - shift)) & ((1 << key_bits) - 1)]
    past = (tail_len >= 0) & (pos + tail_len >= nbits)
    nxt[:, lo:][past] = (pos + tail_len)[past]

    table = memoryview(nxt.reshape(-1))
    paths = []
    p = _HEADER_BITS
    while True:
        path = [(p & 7) * nbytes + (p >> 3)]
        # Mapping over `path` while extending it walks the table in C; it stops with
        # IndexError at the first value that is not a table index.
        with suppress(IndexError):
            path.extend(map(getitem, repeat(table), path))
        end = path.pop()
        paths.append(path)
        if end < big:
            break
        f = end - big  # a block whose length the table could not give
        p = 8 * (f % nbytes) + f // nbytes
        p += _block_length(int(window[p >> 3]) << (p & 7), word_size, rle_sizes)
        if p >= nbits:
            end = p
            break
    shift_of, byte_of = np.divmod(np.fromiter(chain.from_iterable(paths), np.int64), nbytes)
    return 8 * byte_of + shift_of, int(end)


def _block_length(head: int, word_size: int, rle_sizes: tuple[int, ...]) -> int:
    """Bit length of the block whose first bit is bit 31 of ``head``."""
    size = rle_sizes[(head >> 29) & 3]
    count = ((head >> (29 - size)) & ((1 << size) - 1)) + 1
    return 3 + size + word_size * (1 if head >> 31 & 1 else count)


def _as_bytes(rle: Sequence[int] | np.ndarray | bytes) -> bytes:
    """Validate the RLE container and return its bytes."""
    if isinstance(rle, (bytes, bytearray, memoryview)):
        return bytes(rle)
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or not np.issubdtype(rle.dtype, np.integer):
            raise ValueError(f"RLE array must be 1-D integer, got {rle.dtype} {rle.shape}")
        if rle.size and (rle.min() < 0 or rle.max() > 255):
            raise ValueError("RLE values must be bytes (0..255)")
        return rle.astype(np.uint8).tobytes()
    try:
        return bytes(rle)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"RLE must be a sequence of ints in 0..255: {exc}") from None


@lru_cache(maxsize=8)
def _block_lengths(word_size: int, rle_sizes: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """Block bit length for every value of a block's first ``key_bits`` bits (-1: unknown).

    The key covers the flag, size index and a count field of up to 8 bits, so the table stays
    small and cache-resident; only literal blocks with wider count fields are left unknown.
    """
    key_bits = 3 + min(max(rle_sizes), 8)
    key = np.arange(1 << key_bits, dtype=np.int64)
    is_run = key >> (key_bits - 1) == 1
    size_bits = np.array(rle_sizes, np.int64)[(key >> (key_bits - 3)) & 3]
    known = is_run | (size_bits <= key_bits - 3)
    field_shift = np.maximum(key_bits - 3 - size_bits, 0)
    count = ((key >> field_shift) & ((1 << size_bits) - 1)) + 1
    length = 3 + size_bits + word_size * np.where(is_run, 1, count)
    table = np.where(known, length, -1)
    table.setflags(write=False)  # shared through the cache
    return key_bits, table
