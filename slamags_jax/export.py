"""Exports a finished run's models for PyTorch tooling, as safetensors files.

  python -m slamags_jax.export --workdir=<run> --to=torchvision --out=<dir>/encoder.safetensors

writes, for a run whose `pretrain` stage is complete:

- ``<out>``: the encoder as ``torchvision.models.resnet{18,34,50}().state_dict()`` arrays
  (key names and layouts in ``torchvision_io``; no ``fc``), so
  ``resnet18().load_state_dict(safetensors.torch.load_file(out), strict=False)`` misses
  only ``fc.weight`` and ``fc.bias`` (at ``model.width=64``; a narrower encoder loads into
  a ResNet with those channel counts). ``num_batches_tracked`` is the number of
  BatchNorm running-average updates the run made (two view batches per task and step);
- ``<stem>.head.safetensors``: the projection head as ``nn.Sequential(nn.Linear,
  nn.ReLU(), nn.Linear)`` keys (``0.*``, ``2.*``; ``3.*`` the ``weakly`` classifier);
- ``<stem>.mil.safetensors`` (when the `mil` stage is complete): the selected MIL model's
  parameters, Flax names joined with ``.`` and Flax layouts (Dense ``kernel`` [in, out]),
  plus ``input_mean`` / ``input_std`` when its inputs were standardised; the metadata
  (and the model card) hold what ``mil.make_model`` needs to rebuild it;
- ``model_card.json`` beside ``<out>``: model, input preprocessing, files (with sha256),
  the run's config, data, metrics, and the commit of the code that exported it.

Inputs the model expects: RGB crops of ``data.crop_size`` px, ``x / 255`` then per-channel
``(x - data.mean) / data.std``; NCHW in PyTorch. Bad input is one ``error:`` line and exit
status 2; every file is written atomically.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from typing import Any

import numpy as np

from slamags_jax import app
from slamags_jax.interop import torchvision as torchvision_io
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

TARGETS = ("torchvision",)
CARD = "model_card.json"


def _read_json(path: str) -> Any:
  return fileio.read_json(path) if os.path.exists(path) else None


def file_stem(out: str) -> str:
  """``a/encoder.safetensors`` -> ``a/encoder`` (the head and MIL files are named from it)."""
  return out[: -len(".safetensors")] if out.endswith(".safetensors") else out


def code_commit() -> dict[str, Any]:
  """The git commit of this package's source (and whether the tree had changes), if it is a checkout."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args: str) -> str | None:
    try:
      r = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
      return None
    return r.stdout.strip() if r.returncode == 0 else None

  sha = git("rev-parse", "HEAD")
  if sha is None:
    return {"commit": None, "dirty": None}
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"commit": sha, "dirty": bool(status) if status is not None else None}


def encoder_depth(encoder_params: dict) -> int:
  """18, 34 or 50 from the blocks in a ResNet params tree."""
  from slamags_jax import models
  blocks = tuple(sum(1 for name in encoder_params if name.startswith(f"layer{s}_")) for s in range(1, 5))
  bottleneck = "conv3" in encoder_params.get("layer1_0", {})
  for depth, stages in models.STAGE_BLOCKS.items():
    if stages == blocks and (depth >= 50) == bottleneck:
      return depth
  raise UserError(f"the encoder has {blocks} blocks per stage: not a ResNet18/34/50")


def bn_updates(pretrain_summary: dict | None, method: str) -> int:
  """BatchNorm running-average updates of a run: steps x tasks x 2 view batches (PyTorch's count)."""
  from slamags_jax.methods import METHODS
  steps = int((pretrain_summary or {}).get("steps") or 0)
  return steps * 2 * len(METHODS[method].tasks) if method in METHODS else 0


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k in sorted(tree):
    v = tree[k]
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _data_card(manifest: dict | None) -> dict | None:
  if not manifest:
    return None
  bags = manifest.get("bags", [])
  splits = sorted({b["split"] for b in bags})
  return {
      "root": manifest.get("root"), "seed": manifest.get("seed"), "settings": manifest.get("settings"),
      "cells": len(manifest.get("cells", [])), "excluded_images": len(manifest.get("excluded", [])),
      "bags": {s: {"total": sum(b["split"] == s for b in bags),
                   "positive": sum(b["split"] == s and b["label"] == 1 for b in bags)} for s in splits}}


def export(workdir: str, to: str, out: str) -> dict:
  """Writes the files listed in the module docstring; returns the model card."""
  from slamags_jax.runtime import checkpoints
  if to not in TARGETS:
    raise UserError(f"--to={to!r} is not supported; targets: {', '.join(TARGETS)}")
  if not out:
    raise UserError("--out is required, e.g. --out=export/encoder.safetensors")
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is not a folder")
  enc_dir = os.path.join(workdir, "pretrain", "encoder")
  pre_summary = _read_json(os.path.join(workdir, "pretrain", "summary.json"))
  if pre_summary is None or not os.path.isdir(enc_dir):
    raise UserError(f"{workdir} has no finished pretraining (pretrain/summary.json and pretrain/encoder): "
                    "run the pretrain stage first")
  out = os.path.abspath(out)
  if os.path.isdir(out):
    raise UserError(f"--out {out} is a folder; name the encoder file, e.g. {os.path.join(out, 'encoder.safetensors')}")
  out_dir = os.path.dirname(out)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {out_dir}: {e.strerror or e}") from e
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise UserError(f"{out_dir} is not writable")

  cfg = _read_json(os.path.join(workdir, "config.json")) or {}
  method = pre_summary.get("method") or cfg.get("pretrain.method", "")
  variables = checkpoints.load_encoder(enc_dir)
  params, stats = variables["params"], variables["batch_stats"]
  enc_params = params["encoder"]
  depth = encoder_depth(enc_params)
  width = int(np.shape(enc_params["conv1"]["kernel"])[-1])
  crop = cfg.get("data.crop_size")
  meta = {"source": "slamags-jax", "arch": f"resnet{depth}", "width": width, "method": method}

  stem = file_stem(out)
  files: dict[str, Any] = {}
  encoder = torchvision_io.encoder_to_torchvision({"params": enc_params, "batch_stats": stats["encoder"]},
                                                  bn_updates(pre_summary, method))
  torchvision_io.save(out, encoder, {**meta, "part": "encoder"})
  files["encoder"] = {"path": os.path.basename(out), "keys": len(encoder),
                      "layout": f"torchvision resnet{depth}().state_dict() without fc (conv weights OIHW)"}
  head = torchvision_io.head_to_torch(params)
  head_path = stem + ".head.safetensors"
  torchvision_io.save(head_path, head, {**meta, "part": "head"})
  layers = "nn.Linear, nn.ReLU(), nn.Linear" + (", nn.Linear" if "3.weight" in head else "")
  files["head"] = {"path": os.path.basename(head_path), "keys": len(head),
                   "layout": f"nn.Sequential({layers}) state_dict (weights [out, in]); "
                             "input: the encoder's pooled features"}

  mil_summary = _read_json(os.path.join(workdir, "mil", "summary.json"))
  if mil_summary is not None:
    from slamags_jax import mil
    mil_params, mil_meta = mil.load_checkpoint(workdir, "best")
    tensors = _flatten(jax_to_numpy(mil_params))
    for name in ("input_mean", "input_std"):
      if mil_meta.get(name) is not None:
        tensors[name] = np.asarray(mil_meta[name], np.float32)
    mil_path = stem + ".mil.safetensors"
    card_meta = {k: v for k, v in mil_meta.items() if k not in ("input_mean", "input_std")}
    torchvision_io.save(mil_path, tensors, {**meta, "part": "mil", "mil": fileio.to_json(card_meta)})
    files["mil"] = {"path": os.path.basename(mil_path), "keys": len(tensors), "meta": card_meta,
                    "layout": "Flax names joined with '.', Flax layouts (Dense kernel [in, out]); "
                              "input_mean/input_std standardise the embeddings first (when present)"}
  for item in files.values():
    item["sha256"] = fileio.sha256_file(os.path.join(out_dir, item["path"]))

  card = {
      "format": "slamags-jax-model-card/1",
      "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "code": code_commit(),
      "workdir": workdir,
      "model": {"arch": f"resnet{depth}", "depth": depth, "width": width,
                "head_dim": int(np.shape(params["head_fc2"]["kernel"])[-1]),
                "torchvision_loadable": width == 64,
                "embedding": cfg.get("model.embedding"), "method": method},
      "input": {"crop_size": crop, "channels": "RGB", "mean": cfg.get("data.mean"), "std": cfg.get("data.std"),
                "preprocess": "x / 255, then (x - mean) / std per channel; NCHW in PyTorch"},
      "files": files,
      "config": cfg,
      "data": _data_card(_read_json(os.path.join(workdir, "bags", "manifest.json"))),
      "metrics": {"pretrain": pre_summary, "mil": mil_summary,
                  "report": _read_json(os.path.join(workdir, "report", "summary.json"))},
  }
  fileio.write_json(os.path.join(out_dir, CARD), card)
  return card


def jax_to_numpy(tree: Any) -> Any:
  import jax
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def main(argv: list[str] | None = None) -> int:
  p = app.ArgumentParser(prog="python -m slamags_jax.export", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a run's folder (its pretrain stage complete)")
  p.add_argument("--to", default="torchvision", help="target layout: torchvision")
  p.add_argument("--out", required=True, help="the encoder's .safetensors file; head, MIL and model card beside it")
  a = p.parse_args(argv)
  app.quiet_libraries()
  try:
    card = export(a.workdir, a.to, a.out)
  except Exception as e:
    code = app.exit_status(e)  # bad input or an I/O failure: one `error:` line, 2
    if code is None:
      raise
    return code
  out_dir = os.path.dirname(os.path.abspath(a.out))
  for name, item in card["files"].items():
    print(f"{name}: {os.path.join(out_dir, item['path'])}")
  print(f"model card: {os.path.join(out_dir, CARD)}")
  if not card["model"]["torchvision_loadable"]:
    print(f"note: model.width={card['model']['width']}: torchvision's resnet{card['model']['depth']}() has width 64; "
          "load it into a ResNet with this encoder's channel counts")
  return 0


if __name__ == "__main__":
  app.run_argparse(main)
