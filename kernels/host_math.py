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
