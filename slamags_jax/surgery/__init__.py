"""Multi-task gradient combination as optax transforms: AGS, PCGrad, sum, mean, and more.

Every transform here takes *stacked* per-task gradients (each leaf has a leading task
axis ``[T, ...]``) and returns one update pytree without that axis, so it goes first
in an ``optax.chain``; later transforms (weight decay, SGD) see params and updates
without the task axis. ``init(params)`` takes params without the task axis.

The TorchJD 0.18 aggregators, same input and output, each with its paper and TorchJD
counterpart in its docstring: ``upgrad``, ``dualproj``, ``mgda``, ``imtl_g``,
``aligned_mtl``, ``con_fig``, ``krum``, ``constant_weights``, ``random_weights``
(``weighted``: weights from the Gram matrix), ``cagrad``, ``fairgrad``, ``nash_mtl``
(``solvers``), ``gradvac`` (``projection``), ``trimmed_mean``, ``graddrop``,
``excess_mtl`` (``coordinate``: per coordinate). Their state is an ``AggregatorState``
(key, diagnostics, the method's own memory); ``diagnostics`` finds it as it finds
``SurgeryState``. Tested equal to TorchJD in tests/test_surgery_torchjd.py.

Adaptive Gradient Surgery (the rule of docs/reference, "Pretraining"), over the whole
pytree as one vector:

1. ``g'_i = g_i``; for each task i, for each other task j (random order, below):
   if ``<g'_i, g_j> < 0``: ``g'_i -= <g'_i, g_j> / (||g_j||^2 + eps) * g_j``
   (projection against the *original* ``g_j``);
2. ``g = sum_i g'_i``;
3. ``g *= ||sum_i g_i|| / (||g|| + eps)`` (skipped when ``||g|| = 0``).

``pcgrad`` is steps 1-2 (no rescale); ``sum_tasks`` / ``mean_tasks`` are the plain
sum / mean (WeakSupCon, and with T = 1 the single-task methods).

How it is computed (Gram space). Each ``g'_i`` stays a linear combination of the
original gradients, ``g'_i = sum_k A[i, k] g_k``, and ``<g'_i, g_j> = (A G)[i, j]``
with ``G[t, s] = <g_t, g_s>``. So: one pass over the leaves builds the T x T Gram
matrix (float32 or wider, ``Precision.HIGHEST``; with sharded leaves the contraction
is global, XLA inserts the all-reduce); a T x T loop gives the weights
``w = 1^T A``; one weighted sum over the task axis per leaf gives the update. No
per-pair copies of the gradients are ever made.

AGS reads the gradients once more, for ``||g||`` and ``||sum_i g_i||`` measured on the
vectors themselves (two reductions, no copies kept): from the Gram matrix,
``w^T G w`` cancels catastrophically exactly where it matters (float32 error about
1e-7 * sum_i ||g_i||^2 in the *squared* norm, i.e. ``||g||`` is only resolved down to
about 3e-4 * sqrt(sum_i ||g_i||^2)), which would make the degenerate-case threshold
below unresolvable and the rescale factor wrong for small ``||g||``.

Random order. ``g'_i`` depends only on the order of the j it is projected against
(the order of i is irrelevant), so each task i gets its own random permutation of the
other tasks, as PCGrad's code shuffles the task list for every i. The order comes from
a PRNG key kept in the state: each update splits it, ``key, sub = split(key)``, and
uses ``projection_order(sub, T)``; deterministic for a seed. With T = 2 there is only
one other task and the key has no effect.

Degenerate cases (this project's definitions; docs/reference, "Where this project
differs on purpose"):

- A zero task gradient: nothing is projected against it (``<g'_i, 0> = 0`` is not
  negative) and it is not projected; ``eps`` keeps every division finite.
- All gradients zero: the update is exactly zero; no NaN in update or diagnostics.
- ``g1`` close to ``-lambda * g2`` (antiparallel; any lambda > 0): in exact arithmetic
  the surgered ``g`` vanishes, so in floating point it is rounding noise, and the
  authors' rescale would blow that noise up to the full norm ``||g1 + g2||`` in a
  random direction. Rule (AGS only): when
  ``||g||^2 <= rtol^2 * sum_i ||g_i||^2`` the update is the plain sum
  ``sum_i g_i`` instead (a meaningful direction, and its norm is the rescale target
  anyway). ``rtol`` defaults to 1e-5, about 100 float32 roundings; a real conflict
  above that (e.g. ``g2 = -g1 + delta`` with ``||delta|| = 1e-3 ||g1||``) is still
  handled by the exact rule. ``rtol=0`` gives the authors' behaviour.
  ``diagnostics(...).degenerate`` reports when the fallback ran. PCGrad has no
  rescale, so it returns the tiny vector as is.
- The plain sum vanishes but ``g`` does not (T > 2): the rescale makes the update
  (near) zero, as the authors' rule does.

Notes: ``eps`` is absolute, as in the reference (1e-10), so for gradients with
``||g_j||^2`` near 1e-10 the projection is incomplete, as in the authors' code.
Leaves keep their dtype; bf16 leaves are upcast for the dot products and sums.

Diagnostics (cosines, projection flag, norms) live in the state, with fixed shapes
(``num_tasks`` is fixed when the transform is built), for logging:
``surgery.diagnostics(opt_state)`` finds them inside a chain state.

Example (two losses -> stacked gradients -> chain):

>>> import jax, jax.numpy as jnp, optax
>>> from slamags_jax import surgery
>>> params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}
>>> def task_losses(p):  # two tasks that disagree about w
...   loss1 = jnp.sum((p["w"] - 1.0) ** 2) + p["b"] ** 2
...   loss2 = jnp.sum((p["w"] + 2.0) ** 2) + (p["b"] - 1.0) ** 2
...   return jnp.stack([loss1, loss2])
>>> grads = jax.jacrev(task_losses)(params)  # every leaf gets a leading [2] axis
>>> grads["w"].shape
(2, 3)
>>> tx = optax.chain(
...     surgery.adaptive_gradient_surgery(),
...     optax.add_decayed_weights(1e-4),
...     optax.sgd(1e-3, momentum=0.9))
>>> opt_state = tx.init(params)
>>> updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
>>> params = optax.apply_updates(params, updates)
>>> params["w"].shape
(3,)
>>> diag = surgery.diagnostics(opt_state)
>>> bool(diag.projected), bool(diag.cosine[0, 1] < 0)
(True, True)
>>> bool(jnp.allclose(diag.norm_out, diag.norm_sum))
True

(With separate forward passes per task, stack the per-task gradient pytrees instead:
``jax.tree.map(lambda *g: jnp.stack(g), g1, g2)``.)
"""


from slamags_jax.surgery._core import (
    AggregatorState,
    SurgeryDiagnostics,
    SurgeryState,
    all_diagnostics,
    diagnostics,
    gram_matrix,
    weighted_task_sum,
)
from slamags_jax.surgery.coordinate import excess_mtl, graddrop, trimmed_mean
from slamags_jax.surgery.projection import (
    adaptive_gradient_surgery,
    balance_task_norms,
    gradvac,
    mean_tasks,
    pcgrad,
    projection_order,
    projection_weights,
    sum_tasks,
)
from slamags_jax.surgery.solvers import cagrad, fairgrad, nash_mtl
from slamags_jax.surgery.weighted import (
    aligned_mtl,
    con_fig,
    constant_weights,
    dualproj,
    imtl_g,
    krum,
    mgda,
    random_weights,
    upgrad,
)

__all__ = [
    "AggregatorState",
    "SurgeryDiagnostics",
    "SurgeryState",
    "adaptive_gradient_surgery",
    "aligned_mtl",
    "all_diagnostics",
    "balance_task_norms",
    "cagrad",
    "con_fig",
    "constant_weights",
    "diagnostics",
    "dualproj",
    "excess_mtl",
    "fairgrad",
    "graddrop",
    "gradvac",
    "gram_matrix",
    "imtl_g",
    "krum",
    "mean_tasks",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "projection_order",
    "projection_weights",
    "random_weights",
    "sum_tasks",
    "trimmed_mean",
    "upgrad",
    "weighted_task_sum",
]
