"""Stage `embed`: the frozen encoder embeds every cell of every bag, once.

Cells are embedded in fixed-size batches (the last one padded, so nothing recompiles)
with one jitted forward pass per batch, sharded over all devices (each process loads
its rows of every batch; the embeddings are gathered whole on every process and
process 0 writes them); BatchNorm uses its running statistics. What is stored is
`model.embedding`: the projection-head output (as the authors) or the pooled encoder
features. Each cell is embedded once even when the bag simulation put it in several
bags; per-bag arrays are then gathered from it.

Outputs, in `<workdir>/embeddings/`: `<bag_id>.npz` with `embeddings` float32 [n, D] and
`cell_ids` int64 [n] in the bag's cell order, and `index.json` (written last: the
stage's completion marker) with `dim`, `embedding` and one entry per bag
(`id`, `split`, `label`, `k`, `file`, `n`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from slamags_jax.progress import progress

from slamags_jax import bags as bags_lib
from slamags_jax import checkpoints, conv, fileio, input_pipeline, models, parallel


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


def load_encoder_variables(cfg, workdir: str) -> dict:
  path = os.path.join(workdir, "pretrain", "encoder")
  if not os.path.isdir(path):
    from slamags_jax.errors import UserError
    raise UserError(f"no pretrained encoder at {path}: run the pretrain stage first")
  return checkpoints.load_encoder(path)


def run(cfg, workdir: str) -> None:
  out_dir = os.path.join(workdir, "embeddings")
  manifest = bags_lib.load_manifest(workdir)
  mesh = parallel.data_mesh()
  model = models.from_config(cfg)
  variables = parallel.replicate(load_encoder_variables(cfg, workdir), mesh)
  embed_fn = make_embed_fn(model, cfg, mesh)
  batch = max(mesh.size, cfg.embed.batch_size - cfg.embed.batch_size % mesh.size)
  data = input_pipeline.embed_data(manifest, cfg, batch_size=batch, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  ids, embs = [], []
  t0 = time.perf_counter()
  for b in progress(data, total=len(data), desc="embed", unit="batch", disable=not parallel.is_writer()):
    gb = parallel.global_batch({"images": b["images"], "cell_ids": b["cell_ids"], "valid": b["valid"]}, mesh)
    e = parallel.to_host(embed_fn(variables, gb["images"]))
    valid = parallel.to_host(gb["valid"])
    ids.append(parallel.to_host(gb["cell_ids"])[valid])
    embs.append(e[valid])
  wall = time.perf_counter() - t0
  ids = np.concatenate(ids).astype(np.int64)
  embs = np.concatenate(embs).astype(np.float32)
  row = {int(c): i for i, c in enumerate(ids)}
  logging.info("embedded %d cells in %.1f s (%.1f cells/s)", len(ids), wall, len(ids) / max(wall, 1e-9))
  if not parallel.is_writer():
    parallel.sync("embed: outputs written")  # the next stage reads what process 0 writes below
    return
  index = []
  for bag in manifest["bags"]:
    cell_ids = np.asarray(bag["cells"], np.int64)
    fname = f"{bag['id']}.npz"
    fileio.save_npz(os.path.join(out_dir, fname), embeddings=embs[[row[int(c)] for c in cell_ids]],
                    cell_ids=cell_ids)
    index.append({"id": bag["id"], "split": bag["split"], "label": int(bag["label"]), "k": int(bag["k"]),
                  "file": fname, "n": int(len(cell_ids))})
  fileio.write_json(os.path.join(out_dir, "index.json"), {
      "dim": int(embs.shape[1]), "embedding": cfg.model.embedding, "bags": index,
      "cells": int(len(ids)), "wall_s": round(wall, 3), "cells_per_second": round(len(ids) / max(wall, 1e-9), 1)})
  parallel.sync("embed: outputs written")
