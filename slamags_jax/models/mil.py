"""MIL aggregators: Flax modules over padded bags of frozen cell embeddings.

Two aggregators (``mil.model``), both Flax linen modules over a padded batch
``x`` [B, N, D] with ``mask`` [B, N] (True = a real cell):

- ``abmil``: gated-attention ABMIL (Ilse et al., ICML 2018). h = ReLU(Linear(x)),
  a = softmax_n(w^T (tanh(V h) * sigmoid(U h))), z = sum_n a_n h_n, logits = Linear(z).
  ONE attention branch (as Ilse et al.): it is the attention used for ranking cells
  ("abnormal-class attention" of this model). Two logits + softmax cross-entropy
  instead of Ilse's single sigmoid output (the same model up to parameterisation).
- ``pamil``: prototype gated attention (Liu et al., MICCAI 2024), as the SLAM-AGS
  authors run it. Learned prototypes (in input space) and instances pass through one
  shared Linear+ReLU and are L2-normalised; a tanh branch on the prototypes and a
  sigmoid branch on the instances give prototype-instance scores S [N, P] (dot
  products); a Linear(P -> 2) maps them to per-class attention logits, softmax over
  the instances; per class c the attention-pooled feature M_c = sum_n a_cn h_n is
  L2-normalised and scored by its own weight-normalised Linear(H -> 1) (w = g v/|v|).
  The ranking uses the abnormal class's attention a_1n. Two clustering losses, each
  weighted ``mil.cluster_weight`` (0.005), on q = softmax over prototypes of S:
    instance clustering  L_clst  = 1 - mean_n max_p q_np  (each cell near one prototype)
    prototype clustering L_proto = 1 - mean_p max_n q_np  (each prototype near some cell)
  Choices where the reference leaves room: dropout (``mil.dropout``) acts on the
  instance features only (not on the prototypes); both gated branches have width
  ``mil.attention_dim``; prototypes start N(0, 1); Flax default initialisers elsewhere
  (not PyTorch's); the optional prototype-prediction and instance losses of the PAMIL
  code base are off, as in the authors' runs.

Padding and masking: padded cells are zeroed on input, their attention logits are
replaced by a large negative number before the softmax and the attention is multiplied
by the mask, so a padded cell gets exactly zero attention; L2 normalisation is
gradient-safe at zero (x * rsqrt(max(|x|^2, eps^2))), so zero-padded features produce
no NaN gradients; the clustering losses average over real cells only. A bag alone and
the same bag padded inside a batch give the same logits, attention and gradients (test).

Classes: two (normal / abnormal, simulated bags and binary slide labels) or more (slide
labels, ``embeddings/index.json`` ``labels``): softmax cross-entropy over C logits;
PAMIL has one attention branch per class, ABMIL its one branch. The ranking attention
is the abnormal class's for two classes, the called class's (PAMIL) for more; model
selection uses the macro one-vs-rest AUC then.

Training, evaluation and the stage are in ``mil``, which re-exports these names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slamags_jax.runtime.errors import UserError

NUM_CLASSES = 2
ABNORMAL = 1  # class index of "abnormal" (positive bags, witnesses)
_NEG_LOGIT = -1e30  # attention logit of a padded cell (finite: no inf - inf NaNs)

Params = Any


# ----------------------------------------------------------------------------- layers


def masked_softmax(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Softmax along ``axis`` over unmasked entries; masked entries get exactly 0."""
  a = jax.nn.softmax(jnp.where(mask, logits, _NEG_LOGIT), axis=axis)
  return jnp.where(mask, a, 0.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps) with a finite gradient at x = 0 (zero-padded cells)."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class WeightNormDense(nn.Module):
  """Linear layer with weight normalisation w = g * v / |v| (per output unit).

  As PyTorch's ``weight_norm`` the gain g starts at |v|, so w starts equal to v.
  """
  features: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param("direction", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    g = self.param("gain", lambda _: jnp.linalg.norm(v, axis=0))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    w = v * (g / jnp.maximum(jnp.linalg.norm(v, axis=0), 1e-12))
    return x @ w + b


class GatedABMIL(nn.Module):
  """Gated-attention MIL (Ilse et al. 2018) with one attention branch."""
  hidden_dim: int = 128
  attention_dim: int = 64
  dropout: float = 0.0
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> dict[str, Any]:
    x = jnp.where(mask[..., None], x, 0.0)
    h = nn.relu(nn.Dense(self.hidden_dim, name="fc")(x))  # [B, N, H]
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    v = jnp.tanh(nn.Dense(self.attention_dim, name="attention_v")(h))
    u = nn.sigmoid(nn.Dense(self.attention_dim, name="attention_u")(h))
    scores = nn.Dense(1, name="attention_w")(v * u)[..., 0]  # [B, N]
    a = masked_softmax(scores, mask, axis=-1)
    z = jnp.einsum("bn,bnh->bh", a, h)
    logits = nn.Dense(self.num_classes, name="classifier")(z)
    zero = jnp.zeros(x.shape[:1], x.dtype)
    return {"logits": logits, "attention": a, "attention_branches": a[..., None],
            "aux": {"cluster": zero, "proto_cluster": zero}}


class PrototypeGatedMIL(nn.Module):
  """PAMIL-style prototype gated attention with per-class attention (see module doc)."""
  hidden_dim: int = 128
  attention_dim: int = 64
  n_prototypes: int = 8
  dropout: float = 0.0
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> dict[str, Any]:
    x = jnp.where(mask[..., None], x, 0.0)
    protos = self.param("prototypes", nn.initializers.normal(1.0), (self.n_prototypes, x.shape[-1]))
    fc = nn.Dense(self.hidden_dim, name="fc")  # shared by prototypes and instances
    h = nn.relu(fc(x))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = l2_normalize(h)  # [B, N, H]
    p = l2_normalize(nn.relu(fc(protos)))  # [P, H]
    pa = jnp.tanh(nn.Dense(self.attention_dim, name="attention_proto")(p))  # [P, L]
    ib = nn.sigmoid(nn.Dense(self.attention_dim, name="attention_inst")(h))  # [B, N, L]
    s = jnp.einsum("bnl,pl->bnp", ib, pa)  # prototype-instance scores [B, N, P]
    raw = nn.Dense(self.num_classes, name="attention_class")(s)  # [B, N, C]
    a = masked_softmax(raw, mask[..., None], axis=1)  # over instances, per class
    m = l2_normalize(jnp.einsum("bnc,bnh->bch", a, h))  # [B, C, H]
    logits = jnp.concatenate(
        [WeightNormDense(1, name=f"classifier_{c}")(m[:, c]) for c in range(self.num_classes)], axis=-1)
    # Clustering losses on the soft assignment of each cell to the prototypes.
    q = jax.nn.softmax(s, axis=-1)  # [B, N, P]
    n_real = jnp.maximum(mask.sum(-1), 1).astype(x.dtype)
    l_clst = 1.0 - jnp.sum(jnp.where(mask, q.max(-1), 0.0), -1) / n_real
    l_proto = 1.0 - jnp.where(mask[..., None], q, 0.0).max(axis=1).mean(-1)
    return {"logits": logits, "attention": a[..., ABNORMAL], "attention_branches": a,
            "aux": {"cluster": l_clst, "proto_cluster": l_proto}}


class MeanPoolMIL(nn.Module):
  """Plain mean pooling, the baseline without attention: a linear score per cell and class,
  the slide's logits their mean over the cells (= a linear classifier of the mean embedding).

  ``attention`` ranks the cells by their evidence for a class: per class, a softmax over
  the cells of the cell's score for that class minus its mean score over the classes
  (for two classes, half the abnormal-minus-normal score). It does not weight the pooling.
  """
  dropout: float = 0.0
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> dict[str, Any]:
    x = jnp.where(mask[..., None], x, 0.0)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    s = nn.Dense(self.num_classes, name="classifier")(x)  # [B, N, C]
    n_real = jnp.maximum(mask.sum(-1), 1).astype(x.dtype)
    logits = jnp.sum(jnp.where(mask[..., None], s, 0.0), axis=1) / n_real[:, None]
    a = masked_softmax(s - s.mean(-1, keepdims=True), mask[..., None], axis=1)  # [B, N, C]
    zero = jnp.zeros(x.shape[:1], x.dtype)
    return {"logits": logits, "attention": a[..., ABNORMAL], "attention_branches": a,
            "aux": {"cluster": zero, "proto_cluster": zero}}


def make_model(mil_cfg: Any, num_classes: int = NUM_CLASSES) -> nn.Module:
  """The aggregator named by ``mil_cfg.model`` with its sizes from ``mil_cfg`` (or a checkpoint's meta).

  ``num_classes`` > 2: multi-class (slide labels); PAMIL then has one attention branch
  per class, ABMIL keeps its one branch.
  """
  get = (lambda k: mil_cfg[k]) if isinstance(mil_cfg, dict) else (lambda k: getattr(mil_cfg, k))
  if get("model") == "abmil":
    return GatedABMIL(hidden_dim=get("hidden_dim"), attention_dim=get("attention_dim"),
                      dropout=get("dropout"), num_classes=int(num_classes))
  if get("model") == "pamil":
    return PrototypeGatedMIL(hidden_dim=get("hidden_dim"), attention_dim=get("attention_dim"),
                             n_prototypes=get("n_prototypes"), dropout=get("dropout"), num_classes=int(num_classes))
  if get("model") == "mean":
    return MeanPoolMIL(dropout=get("dropout"), num_classes=int(num_classes))
  raise UserError(f"config key 'mil.model' must be abmil, pamil or mean, got {get('model')!r}")


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
  """The aggregator a checkpoint's meta describes (``load_checkpoint``)."""
  return make_model(meta, int(meta.get("num_classes", NUM_CLASSES)))


def init_model(model: nn.Module, key: jax.Array, input_dim: int) -> Params:
  """Fresh parameters for embeddings of width ``input_dim`` (jitted: one compilation)."""
  x = jnp.zeros((1, 1, input_dim), jnp.float32)
  return jax.jit(lambda k: model.init({"params": k}, x, jnp.ones((1, 1), bool))["params"])(key)
