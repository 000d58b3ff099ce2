"""Solver-based weightings: CAGrad, FairGrad, Nash-MTL, in Gram space.

TorchJD calls cvxpy (CAGrad, Nash-MTL) or scipy (FairGrad) on the T x T Gram matrix;
here the same problems are solved in JAX, jit-compatible, with fixed iteration counts:

- CAGrad's dual ``min_{w in simplex} a^T w + s sqrt(w^T G w)`` by alternating the
  exact simplex QP ``min a^T w + s/(2t) w^T G w`` (``_qp.simplex_qp``) with
  ``t = sqrt(w^T G w)`` (the variational form ``s sqrt(q) = min_t s (q/t + t) / 2``;
  jointly convex, so the objective decreases monotonically).
- FairGrad's and Nash-MTL's optimality condition ``G x = x^(-1/alpha)`` (x > 0; Nash-MTL
  is alpha = 1) by damped Newton in ``log x``; the map is strictly monotone for PSD G,
  so the root is unique.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from slamags_jax.surgery._aggregator import aggregator, check_num_tasks, normalize_gram, state_dtype
from slamags_jax.surgery._qp import simplex_qp


def _mv(a: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.sum(a * x[None, :], axis=-1)


def cagrad_weights(gram: jax.Array, c: float, norm_eps: float = 1e-4,
                   iters: int = 30) -> jax.Array:
  """CAGrad's weights (TorchJD's formula) from the trace-normalised Gram matrix."""
  m = gram.shape[0]
  g = normalize_gram(gram, norm_eps)
  ones = jnp.full((m,), 1.0 / m, g.dtype)
  a = _mv(g, ones)
  sqrt_phi = c * jnp.sqrt(jnp.maximum(jnp.sum(a * ones), 0.0))
  tiny = jnp.finfo(g.dtype).tiny ** 0.25

  def body(_, carry):
    w, t = carry
    w = simplex_qp(a, g, sqrt_phi / jnp.maximum(t, tiny))
    return w, jnp.sqrt(jnp.maximum(jnp.sum(w * _mv(g, w)), 0.0))

  t0 = jnp.sqrt(jnp.maximum(jnp.sum(ones * a), 0.0))
  w, _ = jax.lax.fori_loop(0, iters, body, (ones, t0))
  gw = jnp.sqrt(jnp.maximum(jnp.sum(w * _mv(g, w)), 0.0))
  ok = gw >= norm_eps
  return jnp.where(ok, ones + sqrt_phi / jnp.where(ok, gw, 1.0) * w, jnp.zeros_like(w))


def cagrad(num_tasks: int = 2, c: float = 0.5, *, norm_eps: float = 1e-4,
           iters: int = 30) -> optax.GradientTransformation:
  """CAGrad: the mean gradient, corrected to raise the worst task's improvement, within a ball.

  ``d = g0 + sqrt(phi) g_w / ||g_w||`` with ``g0`` the mean gradient,
  ``sqrt(phi) = c ||g0||`` and ``w`` the minimiser over the simplex of
  ``<g_w, g0> + sqrt(phi) ||g_w||``; computed on the trace-normalised Gram matrix as
  TorchJD does. ``c = 0`` is the mean. Solver: module docs, ``iters`` alternations
  (tolerance checked against TorchJD's cvxpy/Clarabel in the tests). Paper: Liu et al.,
  "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS 2021).
  TorchJD: ``CAGrad(c, norm_eps=1e-4)``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}
  >>> tx = surgery.cagrad(num_tasks=2, c=0.5)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 2) for x in out["w"]]
  [0.46, 0.69]
  """
  name = "cagrad"
  check_num_tasks(num_tasks, name)
  if c < 0 or norm_eps < 0 or iters < 1:
    raise ValueError(f"{name}: needs c >= 0, norm_eps >= 0, iters >= 1; got {c}, {norm_eps}, {iters}")

  def combine(updates, gram, extra, key):
    return None, cagrad_weights(gram, c, norm_eps, iters), extra
  return aggregator(name, num_tasks, combine)


def power_root(gram: jax.Array, alpha: float, x0: jax.Array, iters: int = 60) -> jax.Array:
  """The x > 0 with ``G x = x^(-1/alpha)``: damped Newton on ``log x`` (steps clipped to 1)."""
  def body(_, y):
    x = jnp.exp(y)
    p = jnp.exp(-y / alpha)
    f = _mv(gram, x) - p
    jac = gram * x[None, :] + jnp.diag(p / alpha)
    step = jnp.linalg.solve(jac, f)
    step = jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0)
    return y - jnp.clip(step, -1.0, 1.0)
  return jnp.exp(jax.lax.fori_loop(0, iters, body, jnp.log(x0)))


def fairgrad(num_tasks: int = 2, alpha: float = 1.0, *,
             iters: int = 60) -> optax.GradientTransformation:
  """FairGrad: weights with ``G w = w^(-1/alpha)``, alpha-fair utility maximisation.

  ``alpha = 0`` is the mean weighting; ``alpha = 1`` is proportional fairness (the
  Nash bargaining solution of Nash-MTL on the unnormalised Gram matrix); large alpha
  tends to max-min fairness. Solver: module docs (TorchJD uses scipy least_squares
  from the uniform point, tolerance about 1e-8). Paper: Ban & Ji, "Fair Resource
  Allocation in Multi-Task Learning" (ICML 2024). TorchJD: ``FairGrad(alpha)``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  >>> tx = surgery.fairgrad(num_tasks=2, alpha=1.0)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [1.0, 1.0]
  """
  name = "fairgrad"
  check_num_tasks(num_tasks, name)
  if alpha < 0 or iters < 1:
    raise ValueError(f"{name}: needs alpha >= 0 and iters >= 1, got alpha={alpha}, iters={iters}")

  def combine(updates, gram, extra, key):
    uniform = jnp.full((num_tasks,), 1.0 / num_tasks, gram.dtype)
    if alpha == 0:
      return None, uniform, extra
    return None, power_root(gram, alpha, uniform, iters), extra
  return aggregator(name, num_tasks, combine)


class NashMTLExtra(NamedTuple):
  """Nash-MTL's memory: the last solved weights and the step count."""
  alpha: jax.Array  # [T]
  step: jax.Array  # int32 []


def nash_mtl(num_tasks: int = 2, *, max_norm: float = 1.0, update_weights_every: int = 1,
             iters: int = 60) -> optax.GradientTransformation:
  """Nash-MTL: the Nash bargaining solution ``G a = 1 / a`` (a > 0), clipped to ``max_norm``.

  Every ``update_weights_every`` steps the weights are solved anew (from the previous
  ones), otherwise reused; the update's norm is clipped to ``max_norm`` (0: off).
  Solved on ``G / ||G||_F`` and scaled back (as TorchJD, whose constraints carry the
  factor). TorchJD approximates the same solution with 20 convex-concave iterations of cvxpy
  (ECOS) and stops when ``||G a - 1/a|| < 1e-3``; this solves it to float precision,
  so the two agree to about that tolerance. Paper: Navon et al., "Multi-Task Learning
  as a Bargaining Game" (ICML 2022). TorchJD: ``NashMTL(n_tasks, max_norm=1.0,
  update_weights_every=1, optim_niter=20)``.

  >>> import jax.numpy as jnp
  >>> from slamags_jax import surgery
  >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  >>> tx = surgery.nash_mtl(num_tasks=2, max_norm=0.0)
  >>> out, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
  >>> [round(float(x), 3) for x in out["w"]]
  [1.0, 1.0]
  """
  name = "nash_mtl"
  check_num_tasks(num_tasks, name)
  if max_norm < 0 or update_weights_every < 1 or iters < 1:
    raise ValueError(f"{name}: needs max_norm >= 0, update_weights_every >= 1, iters >= 1; got "
                     f"{max_norm}, {update_weights_every}, {iters}")

  def init_extra(params):
    return NashMTLExtra(alpha=jnp.ones((num_tasks,), state_dtype(params)),
                        step=jnp.zeros((), jnp.int32))

  def combine(updates, gram, extra, key):
    fro = jnp.sqrt(jnp.sum(jnp.square(gram)))
    gn = gram / jnp.where(fro > 0, fro, 1.0)
    root = jnp.sqrt(jnp.where(fro > 0, fro, 1.0))  # G a = 1/a  <=>  Gn (root a) = 1/(root a)
    prev = extra.alpha.astype(gram.dtype)
    solve = (extra.step % update_weights_every) == 0
    alpha = jnp.where(solve, power_root(gn, 1.0, prev * root, iters) / root, prev)
    out = alpha
    if max_norm > 0:
      norm = jnp.sqrt(jnp.maximum(jnp.sum(alpha * _mv(gram, alpha)), 0.0))
      out = jnp.where(norm > max_norm, alpha / jnp.where(norm > 0, norm, 1.0) * max_norm, alpha)
    return None, out, NashMTLExtra(alpha=alpha.astype(extra.alpha.dtype), step=extra.step + 1)
  return aggregator(name, num_tasks, combine, init_extra=init_extra)
