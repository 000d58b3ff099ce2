"""Flax <-> torchvision: the encoder's key names and array layouts, as safetensors files.

``models.ResNet`` has torchvision's topology, so its variables map one to one onto
``torchvision.models.resnet{18,34,50}().state_dict()`` (without ``fc``):

| Flax (``params`` / ``batch_stats``)            | torchvision                                  |
|------------------------------------------------|----------------------------------------------|
| ``conv1/kernel`` HWIO                          | ``conv1.weight`` OIHW                        |
| ``bn1/scale``, ``bn1/bias``                    | ``bn1.weight``, ``bn1.bias``                 |
| ``bn1/mean``, ``bn1/var`` (batch_stats)        | ``bn1.running_mean``, ``bn1.running_var``    |
| (the number of running-average updates)        | ``bn1.num_batches_tracked`` (int64, shape ()) |
| ``layer2_0/conv1/kernel``                      | ``layer2.0.conv1.weight``                    |
| ``layer2_0/downsample_conv/kernel``            | ``layer2.0.downsample.0.weight``             |
| ``layer2_0/downsample_bn/...``                 | ``layer2.0.downsample.1....``                |

The projection head (``head_fc1`` -> ReLU -> ``head_fc2``, and the ``weakly`` method's
``classifier``) maps onto ``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear[, nn.Linear])``:
keys ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias`` (``3.*``), weights ``[out, in]``.

Files are read and written with safetensors' numpy API, so nothing here needs torch.
The key list was checked against torchvision 0.28's ``resnet18().state_dict()`` (the
test compares with a recorded copy, and with torchvision itself where it imports).
Importing (``model.init_from``) fills every encoder variable from the file: a missing
key, a shape that differs or an unexpected key (a deeper ResNet's extra blocks) is an
``error:`` naming it; ``fc.*`` (the ImageNet classifier) and ``num_batches_tracked``
are ignored.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping

import numpy as np

from slamags_jax.runtime.errors import UserError

_BLOCK = re.compile(r"^layer(\d+)_(\d+)$")
_RENAME = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_BN = (("params", "scale", "weight"), ("params", "bias", "bias"),
       ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var"))
HEAD_LAYERS = (("head_fc1", "0"), ("head_fc2", "2"), ("classifier", "3"))
IGNORED = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")


def torch_prefix(path: tuple[str, ...]) -> str:
  """Flax module path inside the encoder -> torchvision module name (``layer1_0/conv1`` -> ``layer1.0.conv1``)."""
  parts = []
  for name in path:
    m = _BLOCK.match(name)
    parts.append(f"layer{m.group(1)}.{m.group(2)}" if m else _RENAME.get(name, name))
  return ".".join(parts)


def _modules(params: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
  """(path, kind) of every conv and BatchNorm module in an encoder params tree."""
  if "kernel" in params:
    yield path, "conv"
  elif "scale" in params:
    yield path, "bn"
  else:
    for name in params:  # definition order (torchvision's) where the tree kept it
      yield from _modules(params[name], path + (name,))


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def encoder_to_torchvision(encoder: Mapping[str, Any], num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """``{"params", "batch_stats"}`` of a ``models.ResNet`` -> torchvision state_dict arrays (float32)."""
  params, stats = encoder["params"], encoder["batch_stats"]
  out: dict[str, np.ndarray] = {}
  for path, kind in _modules(params):
    key = torch_prefix(path)
    if kind == "conv":
      out[f"{key}.weight"] = np.ascontiguousarray(np.transpose(np.asarray(_get(params, path)["kernel"], np.float32),
                                                               (3, 2, 0, 1)))
      continue
    for coll, flax_name, torch_name in _BN:
      tree = params if coll == "params" else stats
      out[f"{key}.{torch_name}"] = np.asarray(_get(tree, path)[flax_name], np.float32)
    out[f"{key}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
  return out


def head_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The projection head (and classifier, if any) of ``SlamModel`` params -> ``nn.Sequential`` keys."""
  out = {}
  for name, index in HEAD_LAYERS:
    if name in params:
      out[f"{index}.weight"] = np.ascontiguousarray(np.asarray(params[name]["kernel"], np.float32).T)
      out[f"{index}.bias"] = np.asarray(params[name]["bias"], np.float32)
  return out


def encoder_from_torchvision(tensors: Mapping[str, np.ndarray], like: Mapping[str, Any], *,
                             source: str = "the file") -> dict:
  """torchvision state_dict arrays -> ``{"params", "batch_stats"}`` shaped like ``like`` (a ResNet's).

  Every variable of ``like`` must be in ``tensors`` with the matching (torch-layout)
  shape; keys ``like`` has no place for (other than ``fc.*`` and ``num_batches_tracked``)
  are an error too, so a ResNet34 file is not silently cut down to a ResNet18.
  """
  params, stats = like["params"], like["batch_stats"]
  new: dict = {"params": {}, "batch_stats": {}}
  used = set()

  def take(key: str, want: tuple[int, ...]) -> np.ndarray:
    if key not in tensors:
      raise UserError(f"{source} has no key {key!r} (expected a torchvision ResNet state_dict; "
                      f"it holds {len(tensors)} keys, e.g. {', '.join(sorted(tensors)[:3]) or 'none'})")
    value = np.asarray(tensors[key])
    if tuple(value.shape) != tuple(want):
      raise UserError(f"{source}: key {key!r} has shape {tuple(value.shape)}, this model needs {tuple(want)} "
                      "(check model.depth and model.width)")
    if not np.issubdtype(value.dtype, np.floating):
      raise UserError(f"{source}: key {key!r} has dtype {value.dtype}, expected floating point")
    used.add(key)
    return value.astype(np.float32)

  for path, kind in _modules(params):
    key = torch_prefix(path)
    if kind == "conv":
      h, w, i, o = np.shape(_get(params, path)["kernel"])
      _set(new["params"], path + ("kernel",), np.transpose(take(f"{key}.weight", (o, i, h, w)), (2, 3, 1, 0)))
      continue
    for coll, flax_name, torch_name in _BN:
      tree = params if coll == "params" else stats
      want = np.shape(_get(tree, path)[flax_name])
      _set(new[coll], path + (flax_name,), take(f"{key}.{torch_name}", want))
  extra = sorted(k for k in tensors if k not in used and not IGNORED.search(k))
  if extra:
    raise UserError(f"{source} has {len(extra)} key(s) this model has no place for, e.g. {extra[0]!r} "
                    "(a deeper ResNet, or not a ResNet? check model.depth)")
  return new


def save(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file atomically (temporary file, then rename)."""
  from safetensors.numpy import save as st_save

  from slamags_jax.runtime import fileio
  meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
  # np.asarray(order="C"), not ascontiguousarray: that makes 0-d arrays (num_batches_tracked) 1-d.
  fileio.write_bytes(path, st_save({k: np.asarray(v, order="C") for k, v in tensors.items()}, metadata=meta))


def load(path: str) -> dict[str, np.ndarray]:
  """The arrays of a safetensors file; ``UserError`` when it is missing or not safetensors."""
  from safetensors.numpy import load_file
  if not os.path.isfile(path):
    raise UserError(f"{path} not found (expected a .safetensors file)")
  try:
    return load_file(path)
  except Exception as e:  # SafetensorError, or a dtype numpy lacks
    raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}: {' '.join(str(e).split())}); "
                    "convert a PyTorch checkpoint with safetensors.torch.save_file(model.state_dict(), path)") from e


def init_encoder(variables: Mapping[str, Any], path: str) -> dict:
  """``SlamModel`` variables with the encoder replaced by the torchvision-layout file at ``path``."""
  encoder = {"params": variables["params"]["encoder"], "batch_stats": variables["batch_stats"]["encoder"]}
  loaded = encoder_from_torchvision(load(path), encoder, source=path)
  return {"params": {**variables["params"], "encoder": loaded["params"]},
          "batch_stats": {**variables["batch_stats"], "encoder": loaded["batch_stats"]}}


def init_state_from(state: Any, path: str) -> Any:
  """A fresh ``pretrain.TrainState`` whose encoder comes from ``path`` (``model.init_from``); as is when empty.

  Only parameter values change: the optimizer state (zero momentum) does not depend on them.
  """
  if not path:
    return state
  import jax
  import jax.numpy as jnp
  new = init_encoder({"params": state.params, "batch_stats": state.batch_stats}, path)
  new = jax.tree_util.tree_map(jnp.asarray, new)
  return state.replace(params=new["params"], batch_stats=new["batch_stats"])
