"""Runs the pipeline: bags -> pretrain -> embed -> mil -> report.

  python -m slamags_jax.main --config=configs/demo.py --workdir=workdirs/demo \
      [--config.<key>=<value> ...]

Flags only; the work is in the stage modules. Stages listed in `config.stages` run in
pipeline order; a stage whose completion marker exists in the workdir is skipped, so
re-running the same command resumes a killed run (pretraining continues from its newest
checkpoint). A completed stage made with different settings is an error rather than a
silent mix: the workdir remembers the config in `config.json`.

Bad input (unknown config key, bad value, missing path, impossible bag settings) ends
with one `error: ...` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from slamags_jax import config as config_lib
from slamags_jax.errors import UserError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for every output of the run (created if missing).")

# Completion marker of each stage, relative to the workdir.
MARKERS = {
    "bags": "bags/manifest.json",
    "pretrain": "pretrain/summary.json",
    "embed": "embeddings/index.json",
    "mil": "mil/summary.json",
    "report": "report/summary.json",
}
# Config keys (prefixes) each stage's output depends on, beyond those of earlier stages.
STAGE_KEYS = {
    "bags": ("seed", "data.", "bags."),
    "pretrain": ("augment.", "model.", "pretrain."),
    "embed": ("embed.",),
    "mil": ("mil.",),
    "report": ("report.",),
}
# Keys that change how a run goes, not what it produces.
OPERATIONAL = {"stages", "data.workers", "data.tfds_data_dir", "pretrain.checkpoint_every_steps",
               "pretrain.keep_checkpoints", "pretrain.log_every_steps", "pretrain.max_bad_steps",
               "embed.batch_size", "report.gallery_bags", "report.gallery_max_cells"}


def _stage_fn(stage: str):
  # Imported on demand: `--config.stages=bags` never loads the model stack.
  if stage == "bags":
    from slamags_jax import bags
    return bags.run
  if stage == "pretrain":
    from slamags_jax import pretrain
    return pretrain.run
  if stage == "embed":
    from slamags_jax import embed
    return embed.run
  if stage == "mil":
    from slamags_jax import mil
    return mil.run
  from slamags_jax import report
  return report.run


def _keys_of(stage: str) -> tuple[str, ...]:
  keys: tuple[str, ...] = ()
  for s in config_lib.STAGES:
    keys += STAGE_KEYS[s]
    if s == stage:
      return keys
  raise KeyError(stage)


def check_workdir_config(flat: dict, workdir: str) -> None:
  """Refuses to reuse completed stages that were made with different settings."""
  from slamags_jax import fileio
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    old = fileio.read_json(path)
  except ValueError:
    return  # unreadable: nothing to compare against
  for stage in config_lib.STAGES:
    if not os.path.exists(os.path.join(workdir, MARKERS[stage])):
      continue
    for key in sorted(flat):
      if key in OPERATIONAL or not key.startswith(_keys_of(stage)) or key not in old:
        continue
      now = list(flat[key]) if isinstance(flat[key], tuple) else flat[key]
      if old[key] != now:
        raise UserError(
            f"stage '{stage}' in {workdir} was made with {key}={old[key]!r}, now {now!r}: use a new --workdir, "
            f"or remove {os.path.join(workdir, os.path.dirname(MARKERS[stage]))} and the later stages' folders to redo it")


def run(cfg, workdir: str) -> None:
  from slamags_jax import fileio
  config_lib.validate(cfg)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  flat = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config_lib.flatten(cfg).items()}
  check_workdir_config(flat, workdir)
  _enable_compilation_cache()
  from slamags_jax import parallel
  parallel.initialize()
  if parallel.is_writer():
    fileio.write_json(os.path.join(workdir, "config.json"), flat)
  wanted = config_lib.split_csv(cfg.stages)
  for stage in config_lib.STAGES:
    if stage not in wanted:
      continue
    if os.path.exists(os.path.join(workdir, MARKERS[stage])):
      logging.info("stage %s: already complete in %s, skipped", stage, workdir)
      continue
    logging.info("stage %s: running", stage)
    _stage_fn(stage)(cfg, workdir)
  logging.info("done: %s", workdir)


class _QuietLibraries(pylogging.Filter):
  """Keeps checkpointing and runtime libraries' INFO chatter out of the run's log."""
  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}jaxlib{os.sep}")

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or not any(s in record.pathname for s in self.NOISY)


def _enable_compilation_cache() -> None:
  """XLA's persistent cache: repeated runs with the same shapes skip compilation."""
  import jax
  cache = os.environ.get("SLAMAGS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "slamags-jax", "xla"))
  if cache and cache.lower() != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _fail(message: str) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(" ".join(str(e).split()))
  except Exception as e:  # a config file that fails to load, a bad override value
    _fail(" ".join(f"{type(e).__name__}: {e}".split()))
  return rest


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/demo.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=workdirs/demo")
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    _fail(" ".join(str(e).split()))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
