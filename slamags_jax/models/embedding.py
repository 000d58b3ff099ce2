"""The frozen encoder as a jitted embedding function, shared by the embed stage and the pretraining probe.

Below both stages on purpose: the pretraining collapse monitor embeds its probe cells
with the same compiled forward pass the embed stage uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slamags_jax import models
from slamags_jax.models import conv
from slamags_jax.runtime import parallel


def make_embed_fn(model: models.SlamModel, cfg, mesh=None, which: str | None = None):
  """jitted ``(variables, uint8 images [b, h, w, 3]) -> float32 [b, D]`` (eval mode).

  ``which`` output of the model: ``model.embedding`` by default, or ``head`` / ``pooled``.
  """
  which = which or cfg.model.embedding
  mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)

  def fn(variables, images):
    out = model.apply(variables, models.normalize(images, mean, std), train=False)
    return out[which].astype(jnp.float32)

  options = conv.compiler_options()
  if mesh is None:
    return jax.jit(fn, compiler_options=options)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh), compiler_options=options)


def embed_array(embed_fn, variables, images: np.ndarray, mesh, batch_size: int) -> np.ndarray:
  """Embeds a small host array (probe sets) in padded fixed-size batches, sharded over ``mesh``.

  Every process passes the whole array (the same on each); each batch is split over all
  devices and the embeddings come back whole on every process.
  """
  n = len(images)
  batch_size = max(mesh.size, batch_size - batch_size % mesh.size)
  out = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    emb = embed_fn(variables, parallel.shard_rows(chunk, mesh))
    out.append(parallel.to_host(emb)[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
