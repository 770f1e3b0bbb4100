"""Triton kernels of loraq, installed as ``loraq.kernels``.

One file per op holds the ``@triton.jit`` kernel and its launcher; importing this package
registers the launchers with :func:`loraq.ops.register`. No autograd and no ``nn`` here.
The fused kernels arrive with the kernel work (see ../shared/DESIGN.md); until then this
package registers nothing and ``loraq info`` says so.
"""
