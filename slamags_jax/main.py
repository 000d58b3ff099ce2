"""Runs the pipeline: bags -> pretrain -> embed -> mil -> report.

  python -m slamags_jax.main --config=configs/demo.py --workdir=workdirs/demo \
      [--config.<key>=<value> ...]

Flags only; the work is in the stage modules. Stages listed in `config.stages` run in
pipeline order; a stage whose completion marker exists in the workdir is skipped, so
re-running the same command resumes a killed run (pretraining continues from its newest
checkpoint; the other stages restart). A completed stage, or a pretraining with
checkpoints, made with different settings is an error rather than a silent mix: the
workdir remembers the config in `config.json`.

Bad input (unknown config key, bad value, missing path, impossible bag settings) ends
with one `error: ...` line on stderr and exit status 2, never a traceback. What can be
checked without doing any work (the config, the workdir's history, the stages' inputs,
the data root and class folders) is checked before anything is created or written.

Faults: one run per workdir (a second one gets an `error:` line naming the first, see
`workdir_lock`); SIGTERM / SIGINT in pretraining or MIL training save the step and exit
143 / 130 (`preemption`); I/O failures (disk full, read-only, permission denied) are one
`error:` line with the path and errno (`ioerrors`), exit status 2.
"""

from __future__ import annotations

import errno
import os
import re

from absl import flags, logging
from ml_collections import config_flags

from slamags_jax import app, pipeline
from slamags_jax import config as config_lib
from slamags_jax.runtime.errors import UserError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for every output of the run (created if missing).")

MARKERS = pipeline.MARKERS  # completion marker of each stage, relative to the workdir
OPERATIONAL = pipeline.OPERATIONAL  # keys that change how a run goes, not what it produces


def _complete(workdir: str, stage: str) -> bool:
  return os.path.exists(os.path.join(workdir, MARKERS[stage]))


def _resumable(workdir: str, stage: str) -> bool:
  """An unfinished stage that a re-run continues rather than restarts (pretraining with checkpoints)."""
  if stage != "pretrain" or _complete(workdir, stage):
    return False
  folder = os.path.join(workdir, "pretrain", "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_workdir_config(flat: dict, workdir: str) -> None:
  """Refuses to reuse completed (or resumable) stages that were made with different settings."""
  from slamags_jax.runtime import fileio
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    old = fileio.read_json(path)
  except ValueError:
    return  # unreadable: nothing to compare against
  for stage in pipeline.NAMES:
    done = _complete(workdir, stage)
    if not (done or _resumable(workdir, stage)):
      continue
    for key in sorted(flat):
      if key in OPERATIONAL or not key.startswith(pipeline.keys_of(stage)) or key not in old:
        continue
      now = list(flat[key]) if isinstance(flat[key], tuple) else flat[key]
      if old[key] != now:
        what = "was made" if done else "has checkpoints (a re-run continues them) made"
        raise UserError(
            f"stage '{stage}' in {workdir} {what} with {key}={old[key]!r}, now {now!r}: use a new --workdir, "
            f"or remove {os.path.join(workdir, os.path.dirname(MARKERS[stage]))} and the later stages' folders "
            "to redo it")


def check_stage_inputs(cfg, workdir: str, wanted: list[str]) -> None:
  """Fails early when a wanted stage's inputs will not exist, or completed stages disagree.

  Each stage reads the output of the one before it: that stage must be complete or run
  now. A completed stage after an unfinished one was made from outputs that are gone
  (or being redone), and would be silently reused.
  """
  stages = pipeline.NAMES
  for before, stage in zip(stages, stages[1:]):
    if stage in wanted and not _complete(workdir, stage) and not (before in wanted or _complete(workdir, before)):
      raise UserError(f"stage '{stage}' needs the output of stage '{before}', which is not in {workdir}: "
                      f"add {before} to --config.stages (e.g. --config.stages={before},{stage})")
    if _complete(workdir, stage) and not _complete(workdir, before):
      raise UserError(f"stage '{stage}' is complete in {workdir} but the stage '{before}' it was made from is not: "
                      f"remove {os.path.join(workdir, os.path.dirname(MARKERS[stage]))} and the later stages' "
                      "folders to redo them")
  if "bags" in wanted and not _complete(workdir, "bags"):
    from slamags_jax import bags
    bags.check(cfg)  # the bag source's own checks (data root, class or slide folders, CSVs)


def run(cfg, workdir: str) -> None:
  """Checks everything it can, then runs the wanted stages that are not complete yet."""
  from slamags_jax.runtime import fileio
  config_lib.validate(cfg)
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} exists and is not a folder")
  flat = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config_lib.flatten(cfg).items()}
  wanted = config_lib.split_csv(cfg.stages)
  check_workdir_config(flat, workdir)
  check_stage_inputs(cfg, workdir, wanted)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir}: {e.strerror or e}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    code = errno.EROFS if os.statvfs(workdir).f_flag & os.ST_RDONLY else errno.EACCES
    raise UserError(f"--workdir {workdir} is not writable: {os.strerror(code)} ({errno.errorcode[code]})")
  app.enable_compilation_cache()
  from slamags_jax.runtime import parallel, workdir_lock
  parallel.initialize()
  with workdir_lock.hold(workdir):  # one run per workdir, taken before anything is written
    if parallel.is_writer():
      # Temporary files of atomic writes that a kill interrupted: in the stages' folders, and
      # of config.json (other tools may keep their own files in the workdir itself).
      stale = fileio.remove_stale_temps(workdir, "config.json")
      for marker in MARKERS.values():
        stale += fileio.remove_stale_temps(os.path.join(workdir, os.path.dirname(marker)))
      for path in stale:
        logging.info("removed %s, left by a killed write", path)
      fileio.write_json(os.path.join(workdir, "config.json"), flat)
    for stage in pipeline.NAMES:
      if stage not in wanted:
        continue
      if _complete(workdir, stage):
        logging.info("stage %s: already complete in %s, skipped", stage, workdir)
        continue
      logging.info("stage %s: running", stage)
      pipeline.stage_fn(stage)(cfg, workdir)
  report_md = os.path.join(workdir, "report", "report.md")
  if _complete(workdir, "report") and os.path.exists(report_md):
    summary = fileio.read_json(os.path.join(workdir, MARKERS["report"]))
    num = lambda key: float("nan") if summary.get(key) is None else summary[key]  # noqa: E731  (JSON null = NaN)
    shown = os.path.relpath(report_md) if not os.path.relpath(report_md).startswith("..") else report_md
    if summary.get("source") == "slides":
      logging.info("done: test slides accuracy %.3f, macro F1 %.3f, macro ROC-AUC %.3f; the report is %s",
                   num("bag_accuracy"), num("macro_f1"), num("macro_auc"), shown)
    else:
      logging.info("done: test bag ROC-AUC %.3f, recall@%d %.3f (a random ranking: %.3f); the report is %s",
                   num("bag_auc"), summary.get("topk_k", 0), num("recall_at_k_mean"), num("random_recall_at_k_mean"),
                   shown)
  else:
    logging.info("done: %s", workdir)


def _fail(message: str) -> None:
  app.fail(message)


_OVERRIDE = re.compile(r"^--?config\.([A-Za-z0-9_.]+)(?:=|$)")


def _unknown_override(argv: list[str]) -> str | None:
  """The message for the first ``--config.<key>`` override that names no config key, or None."""
  for arg in argv[1:]:
    m = _OVERRIDE.match(arg)
    if m and m.group(1) not in config_lib.FIELDS_BY_KEY:
      return config_lib.unknown_key_message(m.group(1), arg.split("=", 1)[0])
  return None


def _config_path(argv: list[str]) -> str | None:
  """The file named by ``--config=<file>[:<arg>]`` (or ``--config <file>``) in ``argv``."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    if not path:
      _fail("--config is empty: name a config file, e.g. --config=configs/demo.py")
    _fail(f"config file {path!r} {'is not a file' if os.path.exists(path) else 'not found'}")
  try:
    rest = FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # ml_collections defers a config file's load error to the first use
  except flags.Error as e:
    _fail(_unknown_override(argv) or " ".join(str(e).split()))
  except Exception as e:  # a config file that fails to load, a bad override value
    _fail(_unknown_override(argv) or " ".join(f"{type(e).__name__}: {e}".split()))
  return rest


@app.guarded
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    _fail("--config is required, e.g. --config=configs/demo.py")
  if not _WORKDIR.value:
    _fail("--workdir is required, e.g. --workdir=workdirs/demo")
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
