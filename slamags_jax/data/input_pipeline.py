"""Grain input pipelines: pretraining batches (P / N patches, two views) and embedding.

Pretraining (``pretrain_data``)
  P = the cells of the positive *train* bags, N = those of the negative train bags
  (``bags.pretrain_pools``; validation bags stay out). Every step takes ``pos_per_step``
  patches from P and ``neg_per_step`` from N, in proportion to |P| and |N| as the
  reference (or ``pretrain.pos_fraction``). Views as the reference: a positive patch gets
  two strong views; a negative patch its centre crop (view 0) and one strong view
  (view 1), or two strong views when ``neg_center_view=False`` (SimCLR / weakly
  supervised baselines).

  Where this project differs on purpose: the reference's sampler slides a window by one
  image per step, so consecutive batches share almost all their images; here an epoch is
  ``floor((|P| + |N|) / B)`` steps and P and N are each visited in a fresh permutation
  every epoch. When a stream needs more patches in an epoch than it holds (rounding of
  the split, or a configured ``pos_fraction``), it wraps around into another fresh
  permutation; a batch that straddles that seam may then hold a cell twice.

  The pipeline is a grain ``MapDataset`` over the global element index
  (step x rows of this process), mapped to (cell, views) and batched per step, so:

  - determinism: element j's cell comes from the permutation keyed by (seed, stream,
    epoch, cycle), its augmentation from ``np.random.default_rng([seed, step, row])``
    with ``row`` its row in the *global* batch; nothing depends on worker-local state,
    so 0 or 8 workers, 1 or 4 processes (concatenated) give the same batches;
  - resume: the iterator is a grain ``DatasetIterator``; ``get_state()`` /
    ``set_state()`` restore it exactly, also in the middle of an epoch and with worker
    processes (restore into an iterator built with the same worker count), and
    ``iterator(start_step=s)`` starts at any step with any worker count;
  - workers: ``data.workers`` processes via grain ``mp_prefetch``, each computing whole
    steps (the slicing happens after the per-step batching), interleaved in order;
    0 workers computes in this process with a small prefetch thread pool;
  - multi-host: process p of P gets its rows of every global batch (``pos_per_step / P``
    positive and ``neg_per_step / P`` negative rows); the split is rounded to multiples
    of P (and of ``multiple_of``, e.g. the device count).

Batches are uint8; normalisation (``data.mean`` / ``data.std``) happens on device.

On-device views (``augment.on_device=true``): the rows carry the decoded, resized cell
(uint8 [S, S, 3]) and its (step, row) instead of the two views, and ``device_augment``
cuts the views inside the jitted step from keys of the same (seed, step, row); the
decoded-cell cache then holds up to ``_ON_DEVICE_CACHE_BYTES`` per process, so cells are
decoded once when the pools fit. Cell choice, epochs, resume and sharding are as above.

Embedding (``embed_data``): every cell referenced by any bag, once, centre-cropped, in
fixed-size batches padded with ``valid=False`` rows so a jitted embedder compiles once.

Images come from the files under ``manifest["root"]`` (``data.source=folder``) or from
the prepared TFDS ``cell_folder`` records (``data.source=tfds``), decoded and resized to
``data.image_size`` on every access, with a small per-process cache of decoded cells.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from slamags_jax import bags as bags_lib
from slamags_jax.data import augment
from slamags_jax.data import cells as data_lib
from slamags_jax.runtime.errors import UserError

# First words of the keyed seeds (distinct streams of one seed).
_PERM, _AUG = 11, 12
_CACHE_BYTES = 256 << 20  # decoded-cell cache per process
_ON_DEVICE_CACHE_BYTES = 2 << 30  # with augment.on_device: the host's only per-cell work is the decode


class CellImages:
  """Decoded cells by id (uint8 [S, S, 3]); picklable, with a bounded per-process cache."""

  def __init__(self, manifest: Mapping[str, Any], image_size: int, source: str = "folder",
               tfds_data_dir: str = "", cache_bytes: int = _CACHE_BYTES):
    self.image_size = int(image_size)
    self.root = manifest["root"]
    self.source = source
    n = 1 + max((c["id"] for c in manifest["cells"]), default=-1)
    self.paths = [""] * n
    for c in manifest["cells"]:
      self.paths[c["id"]] = c["path"]
    self.records = None
    self.reader = None
    if source == "tfds":
      from slamags_jax.data import tfds_cells
      info = manifest.get("tfds") or {}
      data_dir = info.get("data_dir") or tfds_data_dir
      name = info.get("name", "cell_folder")
      if not data_dir:
        raise UserError("data.source=tfds needs data.tfds_data_dir (the manifest was made from the folder)")
      self.reader = tfds_cells.RecordReader(data_dir, name)
      if all("record" in c for c in manifest["cells"]):
        rec = {c["id"]: c["record"] for c in manifest["cells"]}
      else:  # manifest made from the folder: look records up by relative path
        by_path = tfds_cells.index(tfds_cells.BUILDERS[name](data_dir=data_dir)).records_by_path()
        missing = [c["path"] for c in manifest["cells"] if c["path"] not in by_path]
        if missing:
          raise UserError(f"{len(missing)} manifest cells are not in the TFDS dataset at {data_dir!r}, "
                          f"e.g. {missing[0]!r}")
        rec = {c["id"]: by_path[c["path"]] for c in manifest["cells"]}
      self.records = np.full(n, -1, np.int64)
      for i, r in rec.items():
        self.records[i] = r
    elif source != "folder":
      raise UserError(f"data.source must be folder or tfds, got {source!r}")
    self.max_cached = max(0, cache_bytes // (3 * self.image_size ** 2))
    self._cache: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_cache"] = {}  # each process fills its own
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)

  def get(self, cell_id: int) -> np.ndarray:
    cell_id = int(cell_id)
    img = self._cache.get(cell_id)
    if img is not None:
      return img
    if self.reader is not None:
      img = data_lib.decode_image(self.reader.read(self.records[cell_id]), self.image_size)
    else:
      img = data_lib.load_image(os.path.join(self.root, self.paths[cell_id]), self.image_size)
    img.setflags(write=False)
    if len(self._cache) < self.max_cached:
      self._cache[cell_id] = img
    return img

  def many(self, cell_ids: Sequence[int], threads: int = 4) -> list[np.ndarray]:
    """Several cells, decoded in a thread pool, in order."""
    if len(cell_ids) < 16 or threads <= 1:
      return [self.get(i) for i in cell_ids]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      return list(pool.map(self.get, cell_ids))


def _images_for(manifest: Mapping[str, Any], cfg: Any, cache_bytes: int = _CACHE_BYTES) -> CellImages:
  return CellImages(manifest, cfg.data.image_size, cfg.data.source, cfg.data.tfds_data_dir, cache_bytes)


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def split_batch(n_pos: int, n_neg: int, batch_size: int, pos_fraction: float = -1.0,
                process_count: int = 1, multiple_of: int = 1) -> tuple[int, int]:
  """(pos_per_step, neg_per_step): global counts, each a multiple of the process count.

  pos = round(B x |P| / (|P| + |N|)) (or B x ``pos_fraction``), clipped so both streams
  get at least one row per process. Both counts are rounded to multiples of
  lcm(process_count, multiple_of): pass the device count as ``multiple_of`` so each
  stream shards evenly over the devices.
  """
  unit = math.lcm(int(process_count), int(multiple_of))
  if batch_size % unit:
    raise UserError(
        f"pretrain.batch_size {batch_size} must be divisible by {unit} (processes: {process_count}, "
        f"devices: {multiple_of})")
  units = batch_size // unit
  if units < 2:
    raise UserError(
        f"pretrain.batch_size {batch_size} is too small: it needs at least {2 * unit} patches "
        f"so that positive and negative patches each fill a multiple of {unit}")
  frac = n_pos / (n_pos + n_neg) if pos_fraction == -1 else float(pos_fraction)
  pos_units = min(max(_round_half_up(units * frac), 1), units - 1)
  return pos_units * unit, (units - pos_units) * unit


class _PretrainRows:
  """Global element index -> one patch's cell id and its two views (see module docstring)."""

  def __init__(self, images: CellImages, pos_ids: np.ndarray, neg_ids: np.ndarray, *,
               pos_per_step: int, neg_per_step: int, process_index: int, process_count: int,
               steps_per_epoch: int, seed: int, crop: int, augment_cfg: dict[str, float],
               neg_center_view: bool, on_device: bool = False):
    self.images = images
    self.pools = (np.asarray(pos_ids, np.int64), np.asarray(neg_ids, np.int64))
    self.per_step = (pos_per_step, neg_per_step)
    self.local = (pos_per_step // process_count, neg_per_step // process_count)
    self.rows = sum(self.local)
    self.process_index = process_index
    self.steps_per_epoch = steps_per_epoch
    self.seed = seed
    self.crop = crop
    self.augment_cfg = augment_cfg
    self.neg_center_view = neg_center_view
    self.on_device = on_device
    self._perms: dict[tuple[int, int, int], np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_perms"] = {}
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _perm(self, stream: int, epoch: int, cycle: int) -> np.ndarray:
    key = (stream, epoch, cycle)
    perm = self._perms.get(key)
    if perm is None:
      rng = np.random.default_rng([self.seed, _PERM, stream, epoch, cycle])
      perm = rng.permutation(len(self.pools[stream]))
      with self._lock:
        if len(self._perms) >= 8:
          self._perms.pop(next(iter(self._perms)))
        self._perms[key] = perm
    return perm

  def locate(self, index: int) -> tuple[int, int, int, int]:
    """(stream 0=P / 1=N, cell id, step, row in the global batch) of element ``index``."""
    step, r = divmod(int(index), self.rows)
    epoch, t = divmod(step, self.steps_per_epoch)
    stream = 0 if r < self.local[0] else 1
    g = self.process_index * self.local[stream] + (r if stream == 0 else r - self.local[0])
    q = t * self.per_step[stream] + g  # position in this epoch's stream
    pool = self.pools[stream]
    cycle, within = divmod(q, len(pool))
    cell = int(pool[self._perm(stream, epoch, cycle)[within]])
    row = g if stream == 0 else self.per_step[0] + g
    return stream, cell, step, row

  def __call__(self, index: int) -> dict[str, Any]:
    stream, cell, step, row = self.locate(index)
    img = self.images.get(cell)
    if self.on_device:  # the views are cut on the device from (seed, step, row)
      return {"cell": img, "id": cell, "index": np.asarray([step, row], np.int32)}
    rng = np.random.default_rng([self.seed, _AUG, step, row])
    if stream == 1 and self.neg_center_view:
      v0 = augment.center_crop(img, self.crop)
    else:
      v0 = augment.strong_view(img, rng, self.crop, self.augment_cfg)
    v1 = augment.strong_view(img, rng, self.crop, self.augment_cfg)
    return {"views": np.stack([v0, v1]), "id": cell}


class _SplitBatch:
  """Stacks one step's rows into {"pos", "neg", "pos_ids", "neg_ids"} (+ "pos_index", "neg_index"
  on-device: ``pos`` / ``neg`` are then the cells, not their views)."""

  def __init__(self, n_pos: int):
    self.n_pos = n_pos

  def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    ids = np.asarray([r["id"] for r in rows], np.int32)
    p = self.n_pos
    if "cell" in rows[0]:
      cells = np.stack([r["cell"] for r in rows])
      index = np.stack([r["index"] for r in rows])
      return {"pos": cells[:p], "neg": cells[p:], "pos_ids": ids[:p], "neg_ids": ids[p:],
              "pos_index": index[:p], "neg_index": index[p:]}
    views = np.stack([r["views"] for r in rows])
    return {"pos": views[:p], "neg": views[p:], "pos_ids": ids[:p], "neg_ids": ids[p:]}


def _read_options(workers: int) -> grain.ReadOptions:
  # In-process: a couple of threads (Pillow decodes without the GIL). In each worker
  # process: one thread, the processes are the parallelism.
  return grain.ReadOptions(num_threads=1 if workers > 0 else 2, prefetch_buffer_size=2 if workers > 0 else 4)


def _iterate(ds: grain.MapDataset, workers: int) -> grain.DatasetIterator:
  it_ds = ds.to_iter_dataset(_read_options(workers))
  if workers > 0:
    # grain's worker processes read its absl flags; outside an absl app (notebooks,
    # pytest) they are unparsed, so take their defaults. Under app.run: a no-op.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                              worker_init_fn=_worker_init)
  return iter(it_ds)


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Loading workers ignore Ctrl-C: a terminal sends SIGINT to the whole process group,
  and the main process alone decides (it saves the step and stops; see ``preemption``)."""
  del worker_index, worker_count
  import signal
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _augment_dict(cfg: Any) -> dict[str, float]:
  keys = ("flip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "rot90_p")
  return {k: float(cfg.augment[k]) for k in keys}


@dataclasses.dataclass
class PretrainData:
  """The pretraining input: sizes, and checkpointable iterators over ``num_steps`` batches.

  ``pos_per_step`` / ``neg_per_step`` are global counts per step; each batch holds this
  process's rows: ``pos`` uint8 [pos_per_step / process_count, 2, crop, crop, 3], ``neg``
  likewise, and ``pos_ids`` / ``neg_ids`` int32 cell ids. With ``on_device``, ``pos`` /
  ``neg`` are the cells, uint8 [rows, S, S, 3], and ``pos_index`` / ``neg_index`` int32
  [rows, 2] their (step, row in the global batch): ``device_augment.augment_batch``'s input.
  """

  steps_per_epoch: int
  num_steps: int
  pos_per_step: int
  neg_per_step: int
  num_pos: int  # |P|
  num_neg: int  # |N|
  workers: int
  dataset: grain.MapDataset  # step -> this process's batch (random access, for tests)
  rows: _PretrainRows
  on_device: bool = False

  def iterator(self, start_step: int = 0) -> grain.DatasetIterator:
    """A grain iterator from ``start_step`` to the end (``get_state`` / ``set_state``)."""
    if not 0 <= start_step <= self.num_steps:
      raise ValueError(f"start_step {start_step} outside [0, {self.num_steps}]")
    ds = self.dataset if start_step == 0 else self.dataset[start_step:]
    return _iterate(ds, self.workers)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterator()

  def __len__(self) -> int:
    return self.num_steps

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of ``step``, computed directly in this process."""
    return self.dataset[step]


def pretrain_data(manifest: Mapping[str, Any], cfg: Any, *, seed: int, neg_center_view: bool = True,
                  process_index: int = 0, process_count: int = 1, multiple_of: int = 1,
                  workers: int | None = None, on_device: bool | None = None,
                  cache_bytes: int | None = None) -> PretrainData:
  """The pretraining pipeline over the manifest's training bags (see module docstring).

  ``multiple_of`` (e.g. the global device count) makes ``pos_per_step`` and
  ``neg_per_step`` multiples of it, so each stream shards evenly over the devices.
  ``on_device`` (default ``augment.on_device``): cells and (step, row) instead of views.
  ``cache_bytes``: the decoded-cell cache per process (default: by ``on_device``; 0 decodes
  every access, as a pool far larger than the cache does).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  pos_ids, neg_ids = bags_lib.pretrain_pools(manifest)
  if not len(pos_ids) or not len(neg_ids):
    raise UserError("pretraining needs patches from both positive and negative training bags")
  batch_size = int(cfg.pretrain.batch_size)
  pos_per_step, neg_per_step = split_batch(
      len(pos_ids), len(neg_ids), batch_size, cfg.pretrain.pos_fraction, process_count, multiple_of)
  steps_per_epoch = (len(pos_ids) + len(neg_ids)) // batch_size
  if steps_per_epoch == 0:
    raise UserError(
        f"pretrain.batch_size {batch_size} is larger than the {len(pos_ids) + len(neg_ids)} "
        "training patches: lower it or use more or larger training bags")
  num_steps = int(cfg.pretrain.epochs) * steps_per_epoch
  workers = int(cfg.data.workers if workers is None else workers)
  on_device = bool(cfg.augment.on_device if on_device is None else on_device)
  if cache_bytes is None:
    cache_bytes = _ON_DEVICE_CACHE_BYTES if on_device else _CACHE_BYTES
  rows = _PretrainRows(
      _images_for(manifest, cfg, cache_bytes), pos_ids, neg_ids,
      pos_per_step=pos_per_step, neg_per_step=neg_per_step,
      process_index=process_index, process_count=process_count,
      steps_per_epoch=steps_per_epoch, seed=int(seed), crop=int(cfg.data.crop_size),
      augment_cfg=_augment_dict(cfg), neg_center_view=neg_center_view, on_device=on_device)
  ds = (grain.MapDataset.range(num_steps * rows.rows)
        .map(rows)
        .batch(rows.rows, drop_remainder=True, batch_fn=_SplitBatch(rows.local[0])))
  return PretrainData(steps_per_epoch, num_steps, pos_per_step, neg_per_step,
                      len(pos_ids), len(neg_ids), workers, ds, rows, on_device)


class _EmbedBatch:
  """Batch index -> this process's rows of one global embedding batch."""

  def __init__(self, images: CellImages, ids: np.ndarray, global_batch: int, process_index: int,
               process_count: int, crop: int):
    self.images = images
    self.ids = ids
    self.global_batch = global_batch
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.crop = crop

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    start = b * self.global_batch + self.offset
    ids = self.ids[start:start + self.local]
    n = len(ids)
    out = np.zeros((self.local, self.crop, self.crop, 3), np.uint8)
    for i, cid in enumerate(ids):
      out[i] = augment.center_crop(self.images.get(cid), self.crop)
    cell_ids = np.full(self.local, -1, np.int32)
    cell_ids[:n] = ids
    valid = np.zeros(self.local, bool)
    valid[:n] = True
    return {"cell_ids": cell_ids, "images": out, "valid": valid}


@dataclasses.dataclass
class EmbedData:
  """Every bag cell once, centre-cropped, in ``num_batches`` fixed-size batches.

  Each batch: ``cell_ids`` int32 [b] (-1 on padding), ``images`` uint8 [b, crop, crop, 3]
  (zeros on padding), ``valid`` bool [b]; b = batch_size / process_count.
  """

  num_batches: int
  num_cells: int
  batch_size: int
  workers: int
  dataset: grain.MapDataset

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return _iterate(self.dataset, self.workers)


def embed_data(manifest: Mapping[str, Any], cfg: Any, *, batch_size: int, process_index: int = 0,
               process_count: int = 1, workers: int | None = None) -> EmbedData:
  """Every cell referenced by any bag (unique ids, sorted), once, centre-cropped.

  ``batch_size`` is global: every process gets the same number of batches, its
  ``batch_size / process_count`` rows of each; the last global batch is padded.
  """
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"embed batch size {batch_size} must be a positive multiple of the process count {process_count}")
  ids = bags_lib.used_cell_ids(manifest)
  num_batches = -(-len(ids) // batch_size)
  # One pass, each cell read once: no decoded-cell cache (it would only grow to its cap).
  images = CellImages(manifest, cfg.data.image_size, cfg.data.source, cfg.data.tfds_data_dir, cache_bytes=0)
  fn = _EmbedBatch(images, ids, batch_size, process_index, process_count, int(cfg.data.crop_size))
  ds = grain.MapDataset.range(num_batches).map(fn)
  workers = int(cfg.data.workers if workers is None else workers)
  return EmbedData(num_batches, len(ids), batch_size // process_count, workers, ds)


def full_images(manifest: Mapping[str, Any], cfg: Any, cell_ids: Sequence[int],
                size: int | None = None) -> np.ndarray:
  """uint8 [n, size, size, 3] whole cells (default size ``data.image_size``), e.g. for galleries."""
  images = CellImages(manifest, size or cfg.data.image_size, cfg.data.source, cfg.data.tfds_data_dir)
  got = images.many([int(i) for i in cell_ids])
  s = images.image_size
  return np.stack(got) if got else np.zeros((0, s, s, 3), np.uint8)


def center_crops(manifest: Mapping[str, Any], cfg: Any, cell_ids: Sequence[int]) -> np.ndarray:
  """uint8 [n, crop, crop, 3]: the embedding view of the given cells (probe sets, galleries)."""
  crop = int(cfg.data.crop_size)
  full = full_images(manifest, cfg, cell_ids)
  if not len(full):
    return np.zeros((0, crop, crop, 3), np.uint8)
  return np.stack([augment.center_crop(x, crop) for x in full])
