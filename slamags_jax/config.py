"""The configuration schema: every field, its default, its check and its meaning, once.

Configs are data (``ml_collections.ConfigDict``). ``get_base_config()`` builds the
defaults from the schema below; the files in ``configs/`` start from it and override
what their experiment needs. ``validate(config)`` rejects unknown keys, wrong types and
out-of-range values with a ``UserError`` naming the key, before any work starts.
``python -m slamags_jax.config`` prints the schema as a Markdown table (the README's
config reference is generated from it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Callable, Sequence

import ml_collections

from slamags_jax import methods, pipeline
from slamags_jax.runtime.errors import UserError

STAGES = pipeline.NAMES  # pipeline order
METHODS = methods.NAMES  # slamags_jax.methods: the one method registry
TWO_TASK_METHODS = methods.TWO_TASK
AGGREGATORS = methods.AGGREGATORS  # pretrain.aggregator's values


@dataclasses.dataclass(frozen=True)
class Field:
  key: str  # dotted path, e.g. "bags.witness_rate"
  default: Any
  doc: str
  check: Callable[[Any], str | None] | None = None  # returns a problem, or None


def _range(lo=None, hi=None, *, lo_open=False, hi_open=False):
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return "must be a finite number"
    if lo is not None and (v <= lo if lo_open else v < lo):
      return f"must be {'>' if lo_open else '>='} {lo}"
    if hi is not None and (v >= hi if hi_open else v > hi):
      return f"must be {'<' if hi_open else '<='} {hi}"
    return None
  return check


def _choice(*options):
  def check(v):
    return None if v in options else f"must be one of {', '.join(map(str, options))}"
  return check


def _csv_names(*, allow_empty=False):
  def check(v):
    names = split_csv(v)
    if not names and not allow_empty:
      return "must name at least one class (comma-separated)"
    if len(set(names)) != len(names):
      return "names a class twice"
    return None
  return check


def _stages(v):
  names = split_csv(v)
  bad = [s for s in names if s not in STAGES]
  if bad:
    return f"unknown stage {bad[0]!r}; stages are {','.join(STAGES)}"
  if not names:
    return "must name at least one stage"
  return None


def _triple(v):
  if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
    return "must be three numbers (R, G, B)"
  return None


def _positive_triple(v):
  return _triple(v) or (None if all(x > 0 for x in v) else "must be > 0 for each channel")


def _init_from(v):
  if v and not os.path.isfile(v):
    return "names no file (expected a .safetensors file in torchvision's ResNet layout)"
  return None


_INT_POS = _range(1)
_INT_NONNEG = _range(0)
_PROB = _range(0.0, 1.0)

FIELDS: Sequence[Field] = (
    # -- run --
    Field("seed", 0, "Master seed: model init, augmentation order, and (unless `data.seed` >= 0) the cell split and bags.", _INT_NONNEG),
    Field("stages", ",".join(STAGES), f"Comma list of stages to run, from `{','.join(STAGES)}`. Stages already complete in the workdir are skipped.", _stages),
    Field("tensorboard", False, "Also write each training loop's metrics as TensorBoard event files beside `metrics.jsonl` (needs the `tensorboard` extra: tensorboardX); `tensorboard --logdir <workdir>` then shows them.", None),
    # -- data --
    Field("data.root", "", "Cell image folder: one sub-folder per class, images found recursively (PBC `<class>/<name>.jpg`, Matek `<CLASS>/<range>/<CLASS>_NNNNN.jpg`).", None),
    Field("data.source", "folder", "`folder` reads images straight from `data.root`; `tfds` reads the `cell_folder` TFDS dataset prepared from it (see README).", _choice("folder", "tfds")),
    Field("data.tfds_data_dir", "", "TFDS data_dir for `data.source=tfds` (empty: `<workdir>/tfds`).", None),
    Field("data.normal_classes", "lymphocyte,neutrophil", "Comma-separated class folder names of normal cells.", _csv_names()),
    Field("data.abnormal_classes", "erythroblast", "Comma-separated class folder names of abnormal cells (witnesses).", _csv_names()),
    Field("data.seed", -1, "Seed for the cell train/test split and the bags; -1 uses `seed`.", _range(-1)),
    Field("data.image_size", 54, "Cells are resized to this square size (px) when loaded.", _range(8)),
    Field("data.crop_size", 48, "Crop size (px) seen by the encoder: random crops for training, centre crop otherwise. At most `data.image_size`.", _range(8)),
    Field("data.mean", (0.6009, 0.5513, 0.7394), "Per-channel normalisation mean (RGB, on [0, 1] pixels).", _triple),
    Field("data.std", (0.1982, 0.2448, 0.1076), "Per-channel normalisation standard deviation (RGB, on [0, 1] pixels).", _positive_triple),
    Field("data.check_images", True, "Decode every image once before bags are drawn and exclude unreadable files (named in the log).", None),
    Field("data.slides_csv", "", "`bags.source=slides`: CSV with columns `slide_id,label` and optional `patient_id` and `split` (`train`/`val`/`test`); one row per folder `data.root/<slide_id>/`.", None),
    Field("data.negative_labels", "", "`bags.source=slides`: comma-separated slide labels that are normal; SLAM pretraining contrasts their slides with all others. The MIL learns every label.", _csv_names(allow_empty=True)),
    Field("data.cell_labels_csv", "", "`bags.source=slides`, optional: CSV `path,label` of annotated cells (path relative to `data.root`); retrieval metrics are computed on the slides holding annotated cells.", None),
    Field("data.ignore_unlisted_slides", False, "`bags.source=slides`: ignore folders under `data.root` that have no row in `data.slides_csv` (otherwise they are an error).", None),
    Field("data.workers", 0, "Worker processes for image loading and augmentation (0: in the main process, with a prefetch thread).", _range(0, 64)),
    # -- bags --
    Field("bags.source", "simulated", "`simulated`: bags drawn from cell-class folders (the benchmark); `slides`: one bag per slide folder `data.root/<slide_id>/`, labelled by `data.slides_csv`.", _choice("simulated", "slides")),
    Field("bags.folds", 5, "`bags.source=slides` without a `split` column: stratified K-fold splits at patient level (no patient in two splits).", _range(2)),
    Field("bags.fold", 0, "`bags.source=slides`: which fold (0 .. bags.folds-1) is the test split; `bags.val_fraction` of the other patients become validation slides.", _INT_NONNEG),
    Field("bags.min_cells", 1, "`bags.source=slides`: a slide with fewer readable images is an error (also in `predict`).", _INT_POS),
    Field("bags.witness_rate", 0.1, "Share of abnormal cells in a positive bag; a positive bag holds k = max(1, round(bag_size x witness_rate)) of them.", _range(0.0, 1.0, lo_open=True)),
    Field("bags.bag_size", 200, "Cells per bag.", _INT_POS),
    Field("bags.n_train", 60, "Training bags (half negative, half positive); `bags.val_fraction` of them become validation bags.", _range(2)),
    Field("bags.n_test", 60, "Test bags (half negative, half positive).", _range(2)),
    Field("bags.train_fraction", 0.6, "Share of each class's cells in the train pool; the rest form the test pool. No cell is in both.", _range(0.0, 1.0, lo_open=True, hi_open=True)),
    Field("bags.val_fraction", 0.2, "Share of training bags (stratified by label) held out as validation bags for MIL model selection; with `bags.source=slides`, the share of the training fold's patients (stratified by slide label).", _range(0.0, 1.0, hi_open=True)),
    Field("bags.allow_reuse", True, "Allow a cell in several bags of its pool (never across pools) when the pool is too small for distinct cells.", None),
    # -- augmentation (the reference's strong view) --
    Field("augment.flip_p", 0.5, "Probability of a horizontal flip.", _PROB),
    Field("augment.jitter_p", 0.8, "Probability of colour jitter.", _PROB),
    Field("augment.brightness", 0.1, "Colour jitter brightness strength.", _range(0.0)),
    Field("augment.contrast", 0.1, "Colour jitter contrast strength.", _range(0.0)),
    Field("augment.saturation", 0.1, "Colour jitter saturation strength.", _range(0.0)),
    Field("augment.hue", 0.1, "Colour jitter hue strength (at most 0.5).", _range(0.0, 0.5)),
    Field("augment.rot90_p", 0.8, "Probability of a rotation by a random multiple of 90 degrees.", _PROB),
    Field("augment.on_device", False, "Cut the strong views on the device inside the jitted training step (`device_augment.py`): the host only decodes and resizes the cells (kept in memory). Same distributions as the numpy views (the default and the reference), not the same pixels.", None),
    # -- model --
    Field("model.depth", 18, "ResNet depth (18, 34 or 50), torchvision topology.", _choice(18, 34, 50)),
    Field("model.width", 64, "Channels of the first stage (64 = torchvision); smaller for quick CPU runs.", _range(4)),
    Field("model.head_dim", 512, "Hidden and output size of the projection head (Linear -> ReLU -> Linear).", _INT_POS),
    Field("model.embedding", "head", "What the embed stage stores: `head` (projection-head output, as the authors) or `pooled` (encoder features).", _choice("head", "pooled")),
    Field("model.conv_impl", "auto", "Convolution lowering: `xla` (lax.conv), `matmul` (patches x weights), `auto` (matmul on small feature maps, where XLA:CPU convolutions are slow).", _choice("auto", "xla", "matmul")),
    Field("model.dtype", "float32", "Compute dtype of the encoder (parameters stay float32).", _choice("float32", "bfloat16")),
    Field("model.task_heads", "auto", "Projection heads of the two-task methods: `shared` (one head for both tasks, as the authors), `per_task` (a second head of the same shape for the similarity task on the shared encoder; the contrastive task's head is the one embedded), or `auto` (what the method says: `per_task` for the `*_heads` methods, else `shared`).", _choice("auto", "shared", "per_task")),
    Field("model.init_from", "", "Initialise the encoder from this `.safetensors` file in torchvision's ResNet layout (an ImageNet ResNet18/34/50, or `python -m slamags_jax.export` output); empty: random init. See README, Use with PyTorch.", _init_from),
    Field("model.bn_sync", True, "BatchNorm statistics over the global view batch across devices (True) or per device (False).", None),
    # -- pretraining --
    Field("pretrain.method", "slam_ags", f"Pretraining method: {', '.join('`%s`' % m for m in METHODS)} (see docs/reference in README).", _choice(*METHODS)),
    Field("pretrain.epochs", 2, "Passes over the training patches.", _INT_NONNEG),
    Field("pretrain.batch_size", 64, "Patches per step (positive + negative), global over all devices.", _range(2)),
    Field("pretrain.pos_fraction", -1.0, "Share of positive-bag patches in each batch; -1 = |P| / (|P| + |N|), as the reference.", lambda v: None if v == -1 else _range(0.0, 1.0, lo_open=True, hi_open=True)(v)),
    Field("pretrain.lr", 1e-3, "Peak learning rate (SGD).", _range(0.0, lo_open=True)),
    Field("pretrain.momentum", 0.9, "SGD momentum.", _range(0.0, 1.0, hi_open=True)),
    Field("pretrain.weight_decay", 1e-4, "Coupled weight decay on all parameters.", _range(0.0)),
    Field("pretrain.warmup_epochs", 0, "Linear warm-up epochs before the cosine decay to 0 (the schedule steps per epoch, as the reference).", _INT_NONNEG),
    Field("pretrain.temperature", 0.07, "Temperature of NT-Xent and of the similarity loss.", _range(0.0, lo_open=True)),
    Field("pretrain.similarity_temperature", -1.0, "Temperature of the similarity loss alone (its pull scales with 1 / temperature); -1 uses `pretrain.temperature`, as the authors.", lambda v: None if v == -1 else _range(0.0, lo_open=True)(v)),
    Field("pretrain.balance_task_norms", False, "Rescale each task gradient to the mean task-gradient norm before combining them (`surgery.balance_task_norms`); False as the authors.", None),
    Field("pretrain.surgery_scope", "all", "Parameters the gradient surgery sees: `all` (one vector over every parameter, as the authors) or `shared` (the encoder only; with `model.task_heads=per_task` each head takes its own task's gradient, LibMTL's convention).", _choice("all", "shared")),
    Field("pretrain.aggregator", "method", "How a two-task method combines its task gradients: `method` (what the method says: AGS, PCGrad or the sum) or a `slamags_jax.surgery` transform at its defaults (README, Multitask gradient transforms).", _choice(*AGGREGATORS)),
    Field("pretrain.checkpoint_every_steps", 50, "Save a checkpoint every this many steps (the final step is always saved, and so is the step at which a SIGTERM or SIGINT stops the run).", _INT_POS),
    Field("pretrain.keep_checkpoints", 3, "How many recent checkpoints to keep.", _INT_POS),
    Field("pretrain.log_every_steps", 1, "Write a metrics line every this many steps.", _INT_POS),
    Field("pretrain.start_over_if_damaged", False, "On resume, when checkpoints exist but none restores (damaged files; each is named in a warning and moved to `pretrain/damaged_checkpoints/`), start pretraining afresh instead of stopping with an error.", None),
    Field("pretrain.max_bad_steps", 5, "Stop with an error after this many consecutive steps with non-finite loss or gradients (each is skipped).", _INT_POS),
    Field("pretrain.probe_cells", 256, "Fixed probe cells for the per-epoch collapse monitor (embedding spread and effective rank); 0 disables it.", _INT_NONNEG),
    # -- embedding --
    Field("embed.batch_size", 256, "Cells per batch when embedding.", _INT_POS),
    # -- MIL --
    Field("mil.model", "pamil", "Aggregator: `pamil` (prototype gated attention, as the authors), `abmil` (gated attention, Ilse et al. 2018) or `mean` (plain mean pooling of a linear per-cell score: the baseline; its attention only ranks cells).", _choice("pamil", "abmil", "mean")),
    Field("mil.epochs", 100, "Training epochs over the training bags.", _INT_POS),
    Field("mil.lr", 1e-3, "Adam learning rate.", _range(0.0, lo_open=True)),
    Field("mil.weight_decay", 0.0, "Adam weight decay (decoupled, AdamW).", _range(0.0)),
    Field("mil.bags_per_step", 1, "Bags per optimisation step (padded and masked); 1 as the reference.", _INT_POS),
    Field("mil.hidden_dim", 128, "Width of the instance projection (and of the prototypes).", _INT_POS),
    Field("mil.attention_dim", 64, "Width of the gated attention branches (tanh and sigmoid; ABMIL and PAMIL).", _INT_POS),
    Field("mil.n_prototypes", 8, "Learned prototypes (PAMIL).", _INT_POS),
    Field("mil.cluster_weight", 0.005, "Weight of each of PAMIL's clustering losses.", _range(0.0)),
    Field("mil.standardize", True, "Standardise each embedding dimension with the training bags' mean and std before MIL (the same for every method).", None),
    Field("mil.selection", "val_auc", "MIL model selection: `val_auc` (the epoch with the highest validation ROC-AUC, ties by the lower cross-entropy), `val_loss` (the lowest validation cross-entropy, ties by the higher AUC; without validation bags either stops the run with an error) or `last_epoch` (the last epoch, validation or not: only when you ask for it).", _choice("val_auc", "val_loss", "last_epoch")),
    Field("mil.temperature_scaling", False, "Fit a temperature T on the validation bags' logits (cross-entropy; `report/uncertainty.py`) after selection and report softmax(logits / T) as class probabilities, here and in `predict` (calls and attention unchanged). Needs validation bags.", None),
    Field("mil.dropout", 0.0, "Dropout on instance features during MIL training.", _range(0.0, 1.0, hi_open=True)),
    # -- report --
    Field("report.topk", 20, "K of the top-K cell retrieval metrics (20 on PBC-ERB, 400 on paper-scale bags).", _INT_POS),
    Field("report.gallery_bags", 4, "Positive test bags shown in the top-K gallery.", _INT_NONNEG),
    Field("report.gallery_max_cells", 20, "Most top-ranked cells shown per bag in the gallery (the top K is cut here when K is larger).", _INT_POS),
)

FIELDS_BY_KEY = {f.key: f for f in FIELDS}


def split_csv(value: str) -> list[str]:
  """"a, b,,c" -> ["a", "b", "c"]."""
  return [s.strip() for s in str(value).split(",") if s.strip()]


def get_base_config() -> ml_collections.ConfigDict:
  """All fields at their defaults (a fresh, unlocked ConfigDict)."""
  cfg = ml_collections.ConfigDict()
  for f in FIELDS:
    node = cfg
    *parents, leaf = f.key.split(".")
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = f.default
  return cfg



def unknown_key_message(key: str, where: str) -> str:
  """The error for a ``--config.<key>`` that names no config key, with the closest key when one is close."""
  import difflib
  close = difflib.get_close_matches(key, list(FIELDS_BY_KEY), n=1)
  hint = f"; did you mean {close[0]!r}?" if close else "; see `python -m slamags_jax.config` for the keys"
  return f"unknown config key {key!r} in {where}{hint}"


def load(config_path: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The config as ``main`` builds it from the file and ``--config.<key>=<value>`` flags, validated.

  The one loader of the tools that read a config outside ``main`` (the sweep, the folds runner).
  ``UserError`` for a missing file, an unknown key, a value that does not parse or validate.
  """
  from absl import flags
  from ml_collections import config_flags
  if not os.path.isfile(config_path):
    raise UserError(f"config file {config_path!r} {'is not a file' if os.path.exists(config_path) else 'not found'}")
  for key, _ in overrides:
    if key not in FIELDS_BY_KEY:
      raise UserError(unknown_key_message(key, f"--config.{key}"))
  fv = flags.FlagValues()
  argv = ["load", f"--config={config_path}", *[f"--config.{k}={v}" for k, v in overrides]]
  # sys_argv: the override flags are declared from the argv seen at definition time.
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    cfg = fv["config"].value
    cfg.keys()  # ml_collections defers a config file's load error to the first use
  except Exception as e:  # a config that fails to load, a bad value
    raise UserError(" ".join(f"{type(e).__name__}: {e}".split())) from e
  validate(cfg)
  return cfg

def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  items = cfg.items() if hasattr(cfg, "items") else []
  for k, v in items:
    key = f"{prefix}{k}"
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def flatten(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"bags.witness_rate": 0.1, ...}: the config as dotted keys."""
  return _flatten(cfg)


def _type_ok(default: Any, value: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list))
  return True


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ``UserError`` naming the first unknown key or bad value."""
  flat = flatten(cfg)
  for key in flat:
    if key not in FIELDS_BY_KEY:
      raise UserError(f"unknown config key {key!r}")
  for f in FIELDS:
    if f.key not in flat:
      raise UserError(f"config key {f.key!r} is missing (start configs from config.get_base_config())")
    v = flat[f.key]
    if not _type_ok(f.default, v):
      raise UserError(f"config key {f.key!r} must be of type {type(f.default).__name__}, got {v!r}")
    problem = f.check(v) if f.check else None
    if problem:
      raise UserError(f"config key {f.key!r} {problem} (got {v!r})")
  # Cross-field rules.
  if cfg.data.crop_size > cfg.data.image_size:
    raise UserError(f"config key 'data.crop_size' must be <= data.image_size ({cfg.data.image_size}), got {cfg.data.crop_size}")
  overlap = set(split_csv(cfg.data.normal_classes)) & set(split_csv(cfg.data.abnormal_classes))
  if overlap:
    raise UserError(f"config key 'data.abnormal_classes' repeats a normal class: {sorted(overlap)[0]!r}")
  if cfg.pretrain.warmup_epochs > cfg.pretrain.epochs:
    raise UserError(f"config key 'pretrain.warmup_epochs' must be <= pretrain.epochs ({cfg.pretrain.epochs}), got {cfg.pretrain.warmup_epochs}")
  if cfg.bags.fold >= cfg.bags.folds:
    raise UserError(f"config key 'bags.fold' must be < bags.folds ({cfg.bags.folds}), got {cfg.bags.fold}")
  if cfg.bags.source == "slides" and cfg.data.source != "folder":
    raise UserError("config key 'data.source' must be folder with bags.source=slides (slides are read from their folders)")
  if cfg.pretrain.method.endswith("_heads") and cfg.model.task_heads == "shared":
    raise UserError(f"config key 'model.task_heads' is 'shared', but method {cfg.pretrain.method!r} is defined by "
                    "per-task heads (use its base method for a shared head)")
  if cfg.model.task_heads == "per_task" and cfg.pretrain.method not in TWO_TASK_METHODS:
    raise UserError(f"config key 'model.task_heads' is 'per_task', but method {cfg.pretrain.method!r} has one task "
                    f"(per-task heads need one of {', '.join(TWO_TASK_METHODS)})")
  if cfg.pretrain.aggregator != "method" and cfg.pretrain.method not in TWO_TASK_METHODS:
    raise UserError(f"config key 'pretrain.aggregator' is {cfg.pretrain.aggregator!r}, but method "
                    f"{cfg.pretrain.method!r} has one task (an aggregator needs one of {', '.join(TWO_TASK_METHODS)})")
  if cfg.bags.n_train % 2 or cfg.bags.n_test % 2:
    raise UserError("config keys 'bags.n_train' and 'bags.n_test' must be even (half negative, half positive bags)")


# Keys that only the slides bag source reads (with bags.source=simulated they change nothing).
SLIDES_KEYS = ("bags.source", "data.slides_csv", "data.negative_labels", "data.cell_labels_csv",
               "data.ignore_unlisted_slides", "bags.folds", "bags.fold", "bags.min_cells")
# Keys that only the simulated bag source reads.
SIMULATED_KEYS = ("data.normal_classes", "data.abnormal_classes", "bags.witness_rate", "bags.bag_size",
                  "bags.n_train", "bags.n_test", "bags.train_fraction", "bags.allow_reuse")


# Keys added after results were recorded, each with the value that reproduces those
# results (the behaviour from before the key existed). At that value a key is left out of
# settings hashes, so rows recorded before it existed stay valid.
HASH_NEUTRAL_DEFAULTS = {"augment.on_device": False, "tensorboard": False, "pretrain.aggregator": "method",
                         "mil.selection": "val_auc", "mil.temperature_scaling": False}


def inactive_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Keys that do not affect a run's result as this config sets them (for settings hashes).

  With the default ``bags.source=simulated`` these are the slides keys, so fingerprints of
  simulated runs are what they were before the slides source existed; and every key of
  ``HASH_NEUTRAL_DEFAULTS`` at its neutral value.
  """
  flat = flatten(cfg)
  neutral = tuple(k for k, v in HASH_NEUTRAL_DEFAULTS.items() if k in flat and flat[k] == v)
  return (SLIDES_KEYS if cfg.bags.source == "simulated" else ()) + neutral


def data_seed(cfg: ml_collections.ConfigDict) -> int:
  return cfg.seed if cfg.data.seed < 0 else cfg.data.seed


def markdown_table() -> str:
  """The schema as a Markdown table: key, default, meaning."""
  rows = ["| key | default | meaning |", "|---|---|---|"]
  for f in FIELDS:
    default = f.default if not isinstance(f.default, str) else (f"`{f.default}`" if f.default else '""')
    rows.append(f"| `{f.key}` | {default} | {f.doc} |")
  return "\n".join(rows) + "\n"


if __name__ == "__main__":
  sys.stdout.write(markdown_table())
