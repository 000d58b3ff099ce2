"""conv.conv2d equals lax.conv_general_dilated, forward and both gradients, for every lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from slamags_jax.models import conv

# (input size, cin, cout, kernel, stride, padding): the ResNet shapes in miniature,
# including the 2x2- and 4x4-map cases and 1x1 stride-2 shortcuts.
CASES = [
    (9, 3, 4, 7, 2, 3),
    (8, 4, 4, 3, 1, 1),
    (8, 4, 6, 3, 2, 1),
    (2, 6, 6, 3, 1, 1),
    (4, 6, 6, 3, 1, 1),  # 4x4 maps: XLA forward and kernel gradient, matmul input gradient
    (4, 6, 8, 3, 2, 1),
    (8, 4, 6, 1, 2, 0),
    (5, 3, 5, 3, 2, 1),  # odd size at stride 2: torch-style explicit padding
]


def reference(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)


def _inputs(case, dtype):
  size, cin, cout, k, _, _ = case
  rng = np.random.default_rng(sum(case))
  x = rng.standard_normal((2, size, size, cin)).astype(dtype)
  w = rng.standard_normal((k, k, cin, cout)).astype(dtype)
  return jnp.asarray(x), jnp.asarray(w)


@pytest.mark.parametrize("impl", ["xla", "matmul", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_lax(case, impl):
  _, _, _, _, stride, padding = case
  with jax.enable_x64(True):
    x, w = _inputs(case, np.float64)
    y = conv.conv2d(x, w, stride, padding, impl)
    y_ref = reference(x, w, stride, padding)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape))
    loss = lambda f: lambda x, w: jnp.sum(f(x, w, stride, padding) * dy)  # noqa: E731
    gx, gw = jax.grad(loss(lambda *a: conv.conv2d(*a, impl)), argnums=(0, 1))(x, w)
    gx_ref, gw_ref = jax.grad(loss(reference), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-12, atol=1e-12)


def test_float32_under_jit_matches_within_rounding():
  case = (4, 16, 16, 3, 1, 1)
  x, w = _inputs(case, np.float32)
  y_ref = reference(x, w, 1, 1)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape).astype(np.float32))
  fwd_bwd = lambda f: jax.jit(lambda x, w: jax.vjp(lambda x, w: f(x, w), x, w))  # noqa: E731
  y, vjp = fwd_bwd(lambda x, w: conv.conv2d(x, w, 1, 1, "matmul"))(x, w)
  y_ref, vjp_ref = fwd_bwd(lambda x, w: reference(x, w, 1, 1))(x, w)
  scale = float(jnp.max(jnp.abs(y_ref)))
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * scale)
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))))


def test_auto_lowering_rule():
  L = conv.Lowering
  # Tiny maps and 1x1 kernels: matmul everywhere; 4x4 maps: matmul input gradient.
  assert conv.choose_lowering("auto", (8, 2, 2, 512), (3, 3, 512, 512), 1, 1) == L("matmul", "matmul", "matmul")
  assert conv.choose_lowering("auto", (8, 4, 4, 512), (3, 3, 512, 512), 1, 1) == L("xla", "matmul", "xla")
  assert conv.choose_lowering("auto", (8, 32, 32, 64), (1, 1, 64, 128), 2, 0) == L("matmul", "matmul", "matmul")
  # Large maps: XLA, matmul input gradients at stride 2, batch chunks on big outputs.
  assert conv.choose_lowering("auto", (8, 32, 32, 64), (3, 3, 64, 64), 1, 1) == L("xla", "xla", "xla", 1, 4)
  assert conv.choose_lowering("auto", (64, 16, 16, 64), (3, 3, 64, 64), 1, 1) == L("xla", "xla", "xla", 4, 4)
  assert conv.choose_lowering("auto", (64, 128, 128, 3), (7, 7, 3, 64), 2, 3) == L("xla", "matmul", "xla", 1, 4)
  assert conv.choose_lowering("auto", (2, 32, 32, 64), (3, 3, 64, 128), 2, 1) == L("xla", "matmul", "xla", 1, 1)
  with pytest.raises(ValueError):
    conv.choose_lowering("fast", (1, 8, 8, 1), (3, 3, 1, 1), 1, 1)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((8, 32, 32, 2), 3, 1, 1),  # 8192 output positions: chunked kernel gradient
    ((8, 48, 48, 2), 3, 1, 1),  # 18432: chunked forward pass too
    ((8, 64, 64, 3), 7, 2, 3),  # the stem
])
def test_chunked_lowering_matches_lax(shape, kernel, stride, padding):
  lowering = conv.choose_lowering("auto", shape, (kernel, kernel, shape[-1], 3), stride, padding)
  assert lowering.grad_kernel_chunks == 4
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], 3)))
    y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, stride, padding, "auto"), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: reference(x, w, stride, padding), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = jnp.asarray(rng.standard_normal(y_ref.shape))
    for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
      np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-11)


def test_compiler_options_keep_the_function():
  """The CPU compile options change which kernel runs a convolution, not what it computes."""
  assert conv.compiler_options("gpu") == {} and conv.compiler_options("tpu") == {}
  options = conv.compiler_options()
  if jax.default_backend() == "cpu":
    assert options == conv._CPU_OPTIONS or options == {}  # {}: an XLA without the option
  x, w = _inputs((8, 4, 4, 3, 1, 1), np.float32)
  f = lambda x, w: conv.conv2d(x, w, 1, 1, "xla")  # noqa: E731
  compiled = jax.jit(f, compiler_options=options).lower(x, w).compile()
  np.testing.assert_allclose(compiled(x, w), reference(x, w, 1, 1), rtol=1e-5, atol=1e-5)
  if options:  # XLA's own convolution, not a YNNPACK fusion
    assert "convolution(" in compiled.as_text() and "ynn_fusion" not in compiled.as_text()
