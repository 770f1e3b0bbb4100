"""Integer helpers for the launchers' host code.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``s since Triton 3.4: a
call from Python unwraps its arguments and costs about 2.5 µs, and a launch made several. These
are the plain-Python equivalents for grids and block sizes (host time per call, not kernels).
"""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_r(R: int) -> int:
    """The LoRA rank padded for ``tl.dot`` and ``tl.arange``: a power of two, at least 16."""
    return max(16, next_pow2(R))


# The kernels index their tensors with 32-bit integers (Triton's type for program ids, aranges
# and strides below 2**31): an offset past this would wrap around.
INDEX_LIMIT = 2**31


def rows_per_launch(M: int, width: int) -> int:
    """How many rows of ``[M, width]`` operands one launch may take so that every element's offset
    fits in 32 bits: ``M`` itself for all but the largest problems (from 16,744 rows of a
    128,256-wide LM head), else whole 4096s of rows (one tuning bucket) where they fit."""
    if M * width < INDEX_LIMIT:
        return M
    rows = (INDEX_LIMIT - 1) // width
    return rows // 4096 * 4096 if rows >= 4096 else max(1, rows)


def in_row_chunks(launch, M: int, rows: int, out_cols: int, like):
    """An ``[M, out_cols]`` output (``like``'s dtype and device) computed ``rows`` rows at a time,
    ``launch(start, stop)`` giving rows ``start:stop`` (see :func:`rows_per_launch`)."""
    import torch

    out = torch.empty(M, out_cols, device=like.device, dtype=like.dtype)
    for start in range(0, M, rows):
        stop = min(M, start + rows)
        out[start:stop] = launch(start, stop)
    return out
