"""The one registry of the pipeline's stages, in pipeline order.

Each stage has a name (``config.stages``), the module whose ``run(cfg, workdir)`` does it
(imported on demand: ``--config.stages=bags`` never loads the model stack), its completion
marker relative to the workdir, and the config key prefixes its output depends on beyond
those of earlier stages; ``OPERATIONAL`` are the keys that change how a run goes, not
what it produces. ``main``, the config schema, the fault injector and the sweep read
it; nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  module: str  # its ``run(cfg, workdir)`` does the stage
  marker: str  # the file whose presence in the workdir says the stage is complete
  key_prefixes: tuple[str, ...]  # config keys (prefixes) its output depends on, beyond earlier stages'


STAGES: tuple[Stage, ...] = (
    Stage("bags", "slamags_jax.bags", "bags/manifest.json", ("seed", "data.", "bags.")),
    Stage("pretrain", "slamags_jax.pretrain", "pretrain/summary.json", ("augment.", "model.", "pretrain.")),
    Stage("embed", "slamags_jax.embed", "embeddings/index.json", ("embed.",)),
    Stage("mil", "slamags_jax.mil", "mil/summary.json", ("mil.",)),
    Stage("report", "slamags_jax.report", "report/summary.json", ("report.",)),
)
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
MARKERS: dict[str, str] = {s.name: s.marker for s in STAGES}
# Keys that change how a run goes, not what it produces (a workdir made with other values is reused).
OPERATIONAL = frozenset({
    "stages", "tensorboard", "data.workers", "data.tfds_data_dir", "pretrain.checkpoint_every_steps",
    "pretrain.keep_checkpoints", "pretrain.log_every_steps", "pretrain.max_bad_steps", "pretrain.start_over_if_damaged",
    "embed.batch_size", "report.gallery_bags", "report.gallery_max_cells"})


def stage_fn(name: str) -> Callable[..., None]:
  """The stage's ``run(cfg, workdir)``, its module imported now."""
  return importlib.import_module(BY_NAME[name].module).run


def keys_of(name: str) -> tuple[str, ...]:
  """The config key prefixes that the output of stage ``name`` depends on (its own and earlier stages')."""
  keys: tuple[str, ...] = ()
  for s in STAGES:
    keys += s.key_prefixes
    if s.name == name:
      return keys
  raise KeyError(name)
