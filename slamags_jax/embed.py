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
(`id`, `split`, `label`, `k`, `file`, `n`), and `labels` (class names) for slides.

The pass streams (``stream_bags``): each bag's file is written as soon as its cells are
embedded, so memory does not grow with the number of cells of a slide set.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import jax
import numpy as np
from absl import logging

from slamags_jax import bags as bags_lib
from slamags_jax import models
from slamags_jax.data import input_pipeline
from slamags_jax.models.embedding import embed_array, make_embed_fn  # noqa: F401  (embed.make_embed_fn as before)
from slamags_jax.runtime import checkpoints, fileio, parallel
from slamags_jax.runtime.progress import progress


def load_encoder_variables(cfg, workdir: str) -> dict:
  path = os.path.join(workdir, "pretrain", "encoder")
  if not os.path.isdir(path):
    from slamags_jax.runtime.errors import UserError
    raise UserError(f"no pretrained encoder at {path}: run the pretrain stage first")
  return checkpoints.load_encoder(path)


def stream_bags(manifest, cfg, model, variables, mesh, *, batch_size: int | None = None,
                show_progress: bool = True, desc: str = "embed") -> Iterator[tuple[dict, np.ndarray]]:
  """Embeds every cell of the manifest once and yields ``(bag, embeddings [n, D])`` as bags complete.

  Cells are embedded in id order; a bag is yielded as soon as its last cell is embedded,
  and a cell's embedding is dropped once every bag that holds it has been yielded. For
  slides (each cell in one bag, ids numbered slide by slide) the memory held is one
  slide's embeddings, whatever the number of cells; simulated bags (cells shared across
  bags) hold the cells of bags not yet complete. Bags come in completion order; every
  process gets every bag (the embedding is collective over ``mesh``).
  """
  variables = parallel.replicate(variables, mesh)
  embed_fn = make_embed_fn(model, cfg, mesh)
  size = int(batch_size or cfg.embed.batch_size)
  batch = max(mesh.size, size - size % mesh.size)
  data = input_pipeline.embed_data(manifest, cfg, batch_size=batch, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  ids = bags_lib.used_cell_ids(manifest)
  bags = manifest["bags"]
  cells = [np.asarray(b["cells"], np.int64) for b in bags]
  # Position (in embedding order) after which each bag is complete; uses left per cell.
  done_at = np.asarray([int(np.searchsorted(ids, c).max()) + 1 if len(c) else 0 for c in cells], np.int64)
  order = np.argsort(done_at, kind="stable")
  uses = {}
  for c in cells:
    for i in c.tolist():
      uses[i] = uses.get(i, 0) + 1
  held: dict[int, np.ndarray] = {}
  embedded, nxt = 0, 0
  quiet = not (show_progress and parallel.is_writer())
  for b in progress(data, total=len(data), desc=desc, unit="batch", disable=quiet):
    gb = parallel.global_batch({"images": b["images"], "cell_ids": b["cell_ids"], "valid": b["valid"]}, mesh)
    e = parallel.to_host(embed_fn(variables, gb["images"]))
    valid = parallel.to_host(gb["valid"])
    for cid, row in zip(parallel.to_host(gb["cell_ids"])[valid].tolist(), np.array(e[valid], np.float32)):
      held[int(cid)] = row
    embedded += int(valid.sum())
    while nxt < len(order) and done_at[order[nxt]] <= embedded:
      i = int(order[nxt])
      nxt += 1
      members = cells[i].tolist()
      yield bags[i], (np.stack([held[c] for c in members]) if members else np.zeros((0, 0), np.float32))
      for c in members:
        uses[c] -= 1
        if not uses[c]:
          del held[c]


def run(cfg, workdir: str) -> None:
  out_dir = os.path.join(workdir, "embeddings")
  manifest = bags_lib.load_manifest(workdir)
  mesh = parallel.data_mesh()
  model = models.from_config(cfg)
  variables = load_encoder_variables(cfg, workdir)
  writer = parallel.is_writer()
  entries, dim, n_cells = {}, 0, 0
  t0 = time.perf_counter()
  for bag, embs in stream_bags(manifest, cfg, model, variables, mesh):
    dim = int(embs.shape[1])
    n_cells += len(embs)
    if not writer:
      continue
    fname = f"{bag['id']}.npz"
    fileio.save_npz(os.path.join(out_dir, fname), embeddings=embs,
                    cell_ids=np.asarray(bag["cells"], np.int64))
    entries[bag["id"]] = {"id": bag["id"], "split": bag["split"], "label": int(bag["label"]), "k": int(bag["k"]),
                          "file": fname, "n": int(len(embs))}
  wall = time.perf_counter() - t0
  n_unique = int(len(bags_lib.used_cell_ids(manifest)))
  logging.info("embedded %d cells in %.1f s (%.1f cells/s)", n_unique, wall, n_unique / max(wall, 1e-9))
  if not writer:
    parallel.sync("embed: outputs written")  # the next stage reads what process 0 writes below
    return
  index = {"dim": dim, "embedding": cfg.model.embedding, "bags": [entries[b["id"]] for b in manifest["bags"]],
           "cells": n_unique, "wall_s": round(wall, 3), "cells_per_second": round(n_unique / max(wall, 1e-9), 1)}
  if manifest.get("labels"):
    index["labels"] = list(manifest["labels"])
  fileio.write_json(os.path.join(out_dir, "index.json"), index)
  parallel.sync("embed: outputs written")
