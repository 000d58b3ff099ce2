"""ResNet encoder (torchvision topology and conventions) and the SLAM projection head.

Flax API: linen. A linen module is a description; its parameters and BatchNorm
statistics are explicit pytrees passed to ``model.apply``, so the training step stays a
pure function ``(state, batch) -> state`` that ``jax.jit`` and ``jax.grad`` transform
directly, with per-task gradients taken against the same explicit params. (NNX would
need split/merge around every transformed function for the same result.)

Faithful to torchvision's ResNet:
- explicit padding (3 for the 7x7 stem, 1 for 3x3, 0 for 1x1 shortcuts; Flax's 'SAME'
  pads differently at stride 2), max-pool 3x3/2 with padding 1;
- convolutions without bias, Kaiming-normal init with fan_out and ReLU gain;
- BatchNorm with PyTorch's momentum 0.1 and eps 1e-5, scale 1 and bias 0 at init (no
  zero-init of the last BN scale in each block), running variance updated with the
  unbiased batch variance;
- BasicBlock for depths 18/34, Bottleneck (stride on the 3x3, "ResNet v1.5") for 50;
- the projection head is Linear -> ReLU -> Linear with PyTorch's default Linear init.

Several view batches in one call (why): the reference runs one forward pass per view
batch so that BatchNorm statistics are per view batch. Here a call may carry V views
of B patches laid out patch-major (``[B * V, H, W, C]``, view ``v`` of patch ``b`` at row
``b * V + v``); BatchNorm computes statistics per view over its B rows, which is exactly
the reference's per-pass normalisation, while the convolutions see one larger batch
(faster on every backend). Running statistics are updated as V sequential passes would.
Patch-major rows keep each patch's views on one device when the batch is sharded, so
with ``bn_sync`` the statistics are global over the sharded batch and otherwise per
device (``device_groups``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slamags_jax.models.conv import conv2d

BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
BN_EPS = 1e-5

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu") for HWIO kernels."""
  kh, kw, _, cout = shape
  std = math.sqrt(2.0 / (kh * kw * cout))
  return std * jax.random.normal(key, shape, dtype)


def torch_linear_init(fan_in: int):
  """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Conv(nn.Module):
  """Bias-free 2-D convolution with explicit symmetric padding (see ``conv.conv2d``)."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", kaiming_normal_fan_out, (self.kernel, self.kernel, x.shape[-1], self.features))
    return conv2d(x.astype(self.dtype), w.astype(self.dtype), self.stride, self.padding, self.impl)


def _bn_stats(x, groups: int, views: int):
  """x [G*B*V, ..., C] -> xs [G, B, V, ..., C], its per-(group, view) mean and biased variance."""
  n = x.shape[0]
  xs = x.reshape((groups, n // (groups * views), views) + x.shape[1:])
  axes = (1,) + tuple(range(3, xs.ndim - 1))  # patches and space
  mean = jnp.mean(xs, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xs - mean), axis=axes, keepdims=True)
  return xs, axes, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, groups: int, views: int, eps: float):
  """Training-mode batch normalisation with statistics per (device group, view).

  Returns the normalised ``x`` and the statistics (mean and biased variance, shaped
  [G, 1, V, 1, ..., C]) for the running averages. The gradient is the textbook closed
  form, ``dx = scale * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))`` per group and
  view: two reductions and one elementwise pass, about 2-3x faster on CPU than
  differentiating the forward formula (same function; tested against autodiff). The
  statistics outputs are for the running averages only: no gradient flows through them.
  """
  return _bn_train_fwd(x, scale, bias, groups, views, eps)[0]


def _bn_train_fwd(x, scale, bias, groups, views, eps):
  xs, _, mean, var = _bn_stats(x, groups, views)
  rstd = jax.lax.rsqrt(var + eps)
  y = ((xs - mean) * (rstd * scale) + bias).reshape(x.shape)
  return (y, mean, var), (x, mean, rstd, scale)


def _bn_train_bwd(groups, views, eps, res, cotangents):
  del eps
  x, mean, rstd, scale = res
  dy = cotangents[0]  # the statistics feed running averages only (no cotangent to pass on)
  xs = x.reshape((groups, x.shape[0] // (groups * views), views) + x.shape[1:])
  dys = dy.reshape(xs.shape)
  axes = (1,) + tuple(range(3, xs.ndim - 1))
  count = xs.size // (groups * views * xs.shape[-1])
  xhat = (xs - mean) * rstd
  sum_dy = jnp.sum(dys, axis=axes, keepdims=True)
  sum_dy_xhat = jnp.sum(dys * xhat, axis=axes, keepdims=True)
  dx = (scale * rstd) * (dys - sum_dy / count - xhat * (sum_dy_xhat / count))
  reduce_all = tuple(range(xs.ndim - 1))
  return dx.reshape(x.shape), jnp.sum(sum_dy_xhat, axis=reduce_all), jnp.sum(sum_dy, axis=reduce_all)


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nn.Module):
  """PyTorch-convention BatchNorm with statistics per view batch (and per device group).

  In training, rows ``[G * B * V]`` are viewed as ``[G, B, V]`` (device groups, patches,
  views); mean and biased variance are taken per (group, view) over patches and space.
  Running statistics: V sequential momentum updates with the unbiased variance, per view
  averaged over device groups.
  """
  views: int = 1
  device_groups: int = 1
  momentum: float = BN_MOMENTUM
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
    ftype = jnp.promote_types(x.dtype, jnp.float32)  # statistics in float32 (or float64)
    if not train:
      y = (x.astype(ftype) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.eps)
      return (y * scale + bias).astype(x.dtype)

    g, v = self.device_groups, self.views
    n = x.shape[0]
    if n % (g * v):
      raise ValueError(f"batch of {n} rows does not split into {g} device groups x {v} views")
    y, mean, var = batch_norm_train(x.astype(ftype), scale, bias, g, v, self.eps)
    y = y.astype(x.dtype)

    if not self.is_initializing():
      count = x.size // (g * v * c)
      mean_v = jnp.mean(mean.reshape(g, v, c), axis=0)  # [V, C]
      var_v = jnp.mean(var.reshape(g, v, c), axis=0) * (count / max(count - 1, 1))
      m = self.momentum
      decay = (1.0 - m) ** jnp.arange(v - 1, -1, -1, dtype=ftype)[:, None]  # later views weigh more
      keep = (1.0 - m) ** v
      ra_mean.value = keep * ra_mean.value + m * jnp.sum(decay * mean_v, axis=0)
      ra_var.value = keep * ra_var.value + m * jnp.sum(decay * var_v, axis=0)
    return y


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  views: int = 1
  device_groups: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(self.views, self.device_groups, name=name)  # noqa: E731
    y = Conv(self.features, 3, self.stride, 1, self.impl, self.dtype, name="conv1")(x)
    y = nn.relu(bn("bn1")(y, train))
    y = Conv(self.features, 3, 1, 1, self.impl, self.dtype, name="conv2")(y)
    y = bn("bn2")(y, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = Conv(self.features, 1, self.stride, 0, self.impl, self.dtype, name="downsample_conv")(x)
      x = BatchNorm(self.views, self.device_groups, name="downsample_bn")(x, train)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  features: int  # inner width; output is 4x
  stride: int = 1
  views: int = 1
  device_groups: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: BatchNorm(self.views, self.device_groups, name=name)  # noqa: E731
    out = self.features * self.expansion
    y = nn.relu(bn("bn1")(Conv(self.features, 1, 1, 0, self.impl, self.dtype, name="conv1")(x), train))
    y = nn.relu(bn("bn2")(Conv(self.features, 3, self.stride, 1, self.impl, self.dtype, name="conv2")(y), train))
    y = bn("bn3")(Conv(out, 1, 1, 0, self.impl, self.dtype, name="conv3")(y), train)
    if self.stride != 1 or x.shape[-1] != out:
      x = Conv(out, 1, self.stride, 0, self.impl, self.dtype, name="downsample_conv")(x)
      x = BatchNorm(self.views, self.device_groups, name="downsample_bn")(x, train)
    return nn.relu(y + x)


def _pool_taps(x):
  """The 9 strided views of -inf-padded ``x`` that make up each 3x3/2 window, row-major."""
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  b, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  return [jax.lax.slice(xp, (0, i, j, 0), (b, i + 2 * (ho - 1) + 1, j + 2 * (wo - 1) + 1, c), (1, 2, 2, 1))
          for i in range(3) for j in range(3)]


@jax.custom_vjp
def max_pool_3x3_s2_p1(x):
  """torch.nn.MaxPool2d(3, 2, padding=1): padding never wins the max.

  Same values and gradient as ``nn.max_pool`` (the gradient goes to the first maximum of
  each window in row-major order, as XLA's select-and-scatter and PyTorch do), written
  as nine strided views: XLA:CPU lowers the generic max-pool gradient to a
  reduce-window over four materialised index tensors, several times slower.
  """
  taps = _pool_taps(x)
  out = taps[0]
  for t in taps[1:]:
    out = jnp.maximum(out, t)
  return out


def _max_pool_fwd(x):
  y = max_pool_3x3_s2_p1(x)
  return y, (x, y)


def _max_pool_bwd(res, dy):
  x, y = res
  b, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros((b, h + 2, w + 2, c), dy.dtype)
  for k, tap in enumerate(_pool_taps(x)):
    first = (tap == y) & ~taken  # the first maximum of the window routes the gradient
    taken = taken | first
    i, j = divmod(k, 3)
    hi, wi = h + 2 - i - (2 * (ho - 1) + 1), w + 2 - j - (2 * (wo - 1) + 1)
    dxp = dxp + jax.lax.pad(jnp.where(first, dy, 0), jnp.zeros((), dy.dtype),
                            ((0, 0, 0), (i, hi, 1), (j, wi, 1), (0, 0, 0)))
  return (dxp[:, 1:h + 1, 1:w + 1, :],)


max_pool_3x3_s2_p1.defvjp(_max_pool_fwd, _max_pool_bwd)


class ResNet(nn.Module):
  """torchvision ResNet without the fc layer: images -> pooled features."""
  depth: int = 18
  width: int = 64
  views: int = 1
  device_groups: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depth not in STAGE_BLOCKS:
      raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}")
    block = Bottleneck if self.depth >= 50 else BasicBlock
    bn_kw = dict(views=self.views, device_groups=self.device_groups)
    x = Conv(self.width, 7, 2, 3, self.impl, self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(**bn_kw, name="bn1")(x, train))
    x = max_pool_3x3_s2_p1(x)
    for stage, n_blocks in enumerate(STAGE_BLOCKS[self.depth]):
      for b in range(n_blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        x = block(self.width * 2**stage, stride, impl=self.impl, dtype=self.dtype, **bn_kw,
                  name=f"layer{stage + 1}_{b}")(x, train)
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))


class Dense(nn.Module):
  """nn.Linear with PyTorch's default init."""
  features: int

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    init = torch_linear_init(fan_in)
    w = self.param("kernel", init, (fan_in, self.features))
    b = self.param("bias", init, (self.features,))
    return x @ w + b


class SlamModel(nn.Module):
  """Encoder + projection head (+ a bag-label classifier for the weakly supervised baseline).

  Returns ``{"pooled": [N, F], "head": [N, head_dim]}`` and ``"logits": [N, 2]`` when
  ``num_classes`` > 0. With ``task_heads="per_task"`` a second projection head of the
  same shape (``sim_head_fc1/2``) gives ``"head_similarity"``, the similarity task's
  head on the shared encoder (hard parameter sharing); ``"head"`` stays the contrastive
  task's head, the one that is embedded. The default ``"shared"`` is the authors' one
  head for both tasks.
  """
  depth: int = 18
  width: int = 64
  head_dim: int = 512
  num_classes: int = 0
  views: int = 1
  device_groups: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32
  task_heads: str = "shared"

  @nn.compact
  def __call__(self, x, train: bool) -> dict[str, jax.Array]:
    pooled = ResNet(self.depth, self.width, self.views, self.device_groups, self.impl, self.dtype,
                    name="encoder")(x, train)
    h = nn.relu(Dense(self.head_dim, name="head_fc1")(pooled))
    out = {"pooled": pooled, "head": Dense(self.head_dim, name="head_fc2")(h)}
    if self.task_heads == "per_task":
      hs = nn.relu(Dense(self.head_dim, name="sim_head_fc1")(pooled))
      out["head_similarity"] = Dense(self.head_dim, name="sim_head_fc2")(hs)
    if self.num_classes:
      out["logits"] = Dense(self.num_classes, name="classifier")(out["head"])
    return out


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32) -> jax.Array:
  """uint8 (or [0, 255] float) RGB images -> normalised with per-channel mean/std on [0, 1].

  Computed in ``dtype`` promoted to at least float32 (the model casts to its compute
  dtype afterwards).
  """
  dtype = jnp.promote_types(dtype, jnp.float32)
  x = images.astype(dtype) / 255.0
  return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


def param_count(tree) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def task_heads(cfg) -> str:
  """``shared`` or ``per_task``: ``model.task_heads``, or for ``auto`` what the method says."""
  if cfg.model.task_heads != "auto":
    return cfg.model.task_heads
  return "per_task" if cfg.pretrain.method.endswith("_heads") else "shared"


def from_config(cfg, *, views: int = 1, device_groups: int = 1) -> SlamModel:
  """The model described by ``cfg.model`` (and a classifier for ``pretrain.method=weakly``)."""
  return SlamModel(
      depth=cfg.model.depth, width=cfg.model.width, head_dim=cfg.model.head_dim,
      num_classes=2 if cfg.pretrain.method == "weakly" else 0,
      views=views, device_groups=device_groups, impl=cfg.model.conv_impl,
      dtype=jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32,
      task_heads=task_heads(cfg))
