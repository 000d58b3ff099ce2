"""2-D convolution with a lowering chosen per layer shape, for fast training on CPU.

XLA:CPU computes a convolution with one of two kernels: YNNPACK's (the default in
jaxlib 0.10 for every convolution) or its Eigen-based one. On the 2-core x86 CPU of
the benchmark the Eigen kernel is faster on the large maps (e.g. 3x3, 64 -> 64 on 32x32
maps, batch 64: 32 ms forward against 40-50 ms) and about as fast on the others, so
the jitted steps of this package compile with ``compiler_options()``: YNNPACK for
matmuls and reductions only. On tiny maps with many channels both kernels are slow (a
3x3, 512 -> 512 convolution on 2x2 maps, batch 64: about 530 ms forward), while the
same computed as patches x weights (im2col + one matmul) takes 7 ms; stride-2 input
gradients are also faster as matmuls. ``conv2d`` therefore computes the forward pass,
the input gradient and the kernel gradient each with the lowering that is faster for
that layer's shape (a ``jax.custom_vjp``), and every choice computes the same
mathematical function as ``lax.conv_general_dilated`` (the tests check forward and both
gradients).

Layout: NHWC activations, HWIO kernels, symmetric explicit padding (PyTorch style).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


class Lowering(NamedTuple):
  """Which implementation computes each part ("xla" or "matmul"), and in how many
  batch chunks the XLA forward and kernel gradient run (1: the whole batch at once)."""
  forward: str
  grad_input: str
  grad_kernel: str
  forward_chunks: int = 1
  grad_kernel_chunks: int = 1


def _out_size(n: int, k: int, stride: int, pad: int) -> int:
  return (n + 2 * pad - k) // stride + 1


def _chunks(rows: int, positions: int, lo: int, hi: int) -> int:
  """4 batch chunks when the output has between ``lo`` and ``hi`` positions (if they divide)."""
  return 4 if lo <= positions <= hi and rows % 4 == 0 else 1


# YNNPACK for matmuls and reductions (where it is XLA:CPU's fastest kernel) but not for
# convolutions, which then go to XLA:CPU's Eigen kernel (module docstring).
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_options_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS).lower(jnp.zeros(())).compile()
  except Exception:  # an XLA without this option: its own defaults are used
    return False
  return True


def compiler_options(backend: str | None = None) -> dict[str, str]:
  """XLA compile options under which ``choose_lowering``'s "auto" rules were tuned.

  Pass them to the ``jax.jit`` of anything that runs the encoder::

    step = jax.jit(train_step, compiler_options=conv.compiler_options())

  On CPU: YNNPACK for matmuls and reductions only, so that convolutions use XLA's
  Eigen kernel (up to 2x faster on ResNet18's stem and layer1 on the benchmark CPU,
  about equal on the other layers; see docs/performance.md). Empty on GPU/TPU, and on an XLA that lacks the option.
  Numerics are unchanged up to float32 summation order.
  """
  if (backend or jax.default_backend()) != "cpu" or not _cpu_options_supported():
    return {}
  return dict(_CPU_OPTIONS)


def choose_lowering(impl: str, x_shape, kernel_shape, stride: int, padding: int) -> Lowering:
  """The lowering for a layer: ``impl`` is "xla", "matmul" or "auto".

  "auto" follows per-layer and whole-step timings of ResNet18 at 64 and 128 px on a
  2-core x86 CPU, compiled with ``compiler_options()`` (docs/performance.md):
  - 1x1 kernels and maps of at most 2x2 outputs: matmuls everywhere (XLA's convolution
    takes ~530 ms for a 3x3, 512 -> 512 convolution on 2x2 maps, batch 64; the matmul 7 ms);
  - stride-2 3x3 kernels and maps of at most 4x4 outputs: matmul input gradient (on 4x4
    maps XLA's forward and kernel gradient are the faster ones: 3x3, 512 -> 512, batch
    64, kernel gradient 25 ms against 39 ms as a matmul);
  - otherwise XLA's convolution, with the batch cut into 4 chunks for the kernel
    gradient once the output has 4096+ positions (batch x height x width) and for the
    forward pass between 16384 and 65536 positions. The chunks are independent, so
    XLA runs them side by side on the cores; without them the 128 px step is ~12 %
    slower.
  On GPU and TPU use "xla" (the backends' convolutions are the fast path).
  """
  if impl in ("xla", "matmul"):
    return Lowering(impl, impl, impl)
  if impl != "auto":
    raise ValueError(f"unknown convolution lowering {impl!r}")
  kh, kw = kernel_shape[:2]
  ho = _out_size(x_shape[1], kh, stride, padding)
  wo = _out_size(x_shape[2], kw, stride, padding)
  if (kh == 1 and kw == 1) or ho * wo <= 4:
    return Lowering("matmul", "matmul", "matmul")
  rows, positions = x_shape[0], x_shape[0] * ho * wo
  return Lowering("xla", "matmul" if stride > 1 or ho * wo <= 16 else "xla", "xla",
                  forward_chunks=_chunks(rows, positions, 16384, 65536),
                  grad_kernel_chunks=_chunks(rows, positions, 4096, 1 << 62))


def _in_chunks(fn, arrays, chunks: int):
  """``fn`` applied to ``chunks`` equal slices of the batch axis of every array."""
  n = arrays[0].shape[0] // chunks
  return [fn(*[a[i * n:(i + 1) * n] for a in arrays]) for i in range(chunks)]


def _conv_xla(x, w, stride, padding):
  return lax.conv_general_dilated(
      x, w, (stride, stride), [(padding, padding)] * 2, dimension_numbers=_DN)


def _patches(x, kh, kw, stride, padding):
  """im2col: [B, H, W, C] -> [B, Ho, Wo, kh*kw*C], tap-major (matches HWIO reshape)."""
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  _, h, w, _ = x.shape
  ho = (h - kh) // stride + 1
  wo = (w - kw) // stride + 1
  taps = [
      lax.slice(x, (0, i, j, 0), (x.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, x.shape[3]),
                (1, stride, stride, 1))
      for i in range(kh) for j in range(kw)
  ]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _conv_matmul(x, w, stride, padding):
  kh, kw, cin, cout = w.shape
  p = _patches(x, kh, kw, stride, padding)
  return jnp.einsum("bhwk,ko->bhwo", p, w.reshape(kh * kw * cin, cout))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, stride, padding, lowering):
  if lowering.forward != "xla":
    return _conv_matmul(x, w, stride, padding)
  if lowering.forward_chunks == 1:
    return _conv_xla(x, w, stride, padding)
  return jnp.concatenate(_in_chunks(lambda xc: _conv_xla(xc, w, stride, padding), [x], lowering.forward_chunks))


def _conv_fwd(x, w, stride, padding, lowering):
  return _conv(x, w, stride, padding, lowering), (x, w)


def _conv_bwd(stride, padding, lowering, res, dy):
  x, w = res
  kh, kw, cin, cout = w.shape
  if lowering.grad_input == "xla":
    dx = jax.vjp(lambda x_: _conv_xla(x_, w, stride, padding), x)[1](dy)[0]
  else:
    dcols = jnp.einsum("bhwo,ko->bhwk", dy, w.reshape(kh * kw * cin, cout))
    dx = jax.vjp(lambda x_: _patches(x_, kh, kw, stride, padding), x)[1](dcols)[0]
  if lowering.grad_kernel == "xla":
    dw_of = lambda xc, dyc: jax.vjp(lambda w_: _conv_xla(xc, w_, stride, padding), w)[1](dyc)[0]  # noqa: E731
    dw = sum(_in_chunks(dw_of, [x, dy], lowering.grad_kernel_chunks))
  else:
    cols = _patches(x, kh, kw, stride, padding)
    dw = jnp.einsum("bhwk,bhwo->ko", cols, dy).reshape(w.shape)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0, impl: str = "auto") -> jax.Array:
  """Convolution of NHWC ``x`` with HWIO ``w``, symmetric zero ``padding``.

  Same function as ``lax.conv_general_dilated(x, w, (stride, stride),
  [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))`` with the
  forward pass and each gradient lowered as ``choose_lowering`` says.
  """
  lowering = choose_lowering(impl, x.shape, w.shape, stride, padding)
  if lowering == Lowering("xla", "xla", "xla", 1, 1):
    return _conv_xla(x, w, stride, padding)  # plain autodiff, nothing custom
  return _conv(x, w, stride, padding, lowering)
