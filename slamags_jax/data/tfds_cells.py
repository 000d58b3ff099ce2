"""TFDS builders for cell folders and for the Matek bone-marrow dataset (no TensorFlow).

Two ``tfds.core.GeneratorBasedBuilder`` s, both stored as ``array_record`` files and both
read through ``tfds.data_source`` / ``builder.as_data_source()`` (random access, the way
grain reads):

- ``cell_folder`` (``CellFolder``): any cell folder (one sub-folder per class, images
  found recursively; see ``slamags_jax.data.cells``), given as the manual download dir.
  Classes are the folder names.
- ``matek_bone_marrow`` (``MatekBoneMarrow``): the TCIA
  "Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer" folder (Matek et al. 2021,
  171,374 JPEGs, 21 classes, ``<CLASS>/<range>/<CLASS>_NNNNN.jpg``, CC BY 4.0).

Features: ``image`` (the file's encoded bytes, unchanged; decoded with Pillow by
``data.decode_image``), ``label`` (class index; names in the dataset info), ``path``
(path relative to the folder, posix; also the example key). ``tfds.features.Image`` is
avoided on purpose: it needs TensorFlow to encode. Files that do not decode fully are
skipped while generating, logged, and listed in the dataset's metadata ("skipped").

Prepare from the command line::

  python -m slamags_jax.data.tfds_cells --manual_dir=/data/pbc128 --data_dir=/data/tfds
  python -m slamags_jax.data.tfds_cells --name=matek_bone_marrow \\
      --manual_dir=/data/Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer --data_dir=/data/tfds

then run the pipeline with ``--config.data.source=tfds --config.data.tfds_data_dir=/data/tfds``
(the bags stage prepares ``cell_folder`` from ``data.root`` itself when it is missing).
One data_dir holds one prepared ``cell_folder``; use another data_dir for another folder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from slamags_jax import app as cli
from slamags_jax.data import cells as data_lib
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError

INDEX_FILE = "slamags_index.json"
_CHUNK = 256  # files read and checked concurrently while generating

_CITATION_MATEK = """\
@article{matek2021highly,
  title={Highly accurate differentiation of bone marrow cell morphologies using deep neural networks
         on a large image data set},
  author={Matek, Christian and Krappe, Sebastian and M{\\"u}nzenmayer, Christian and Haferlach, Torsten
          and Marr, Carsten},
  journal={Blood},
  volume={138},
  number={20},
  pages={1917--1927},
  year={2021},
  doi={10.1182/blood.2020010568}
}"""

MATEK_CLASSES = (
    "ABE", "ART", "BAS", "BLA", "EBO", "EOS", "FGC", "HAC", "KSC", "LYI", "LYT",
    "MMZ", "MON", "MYB", "NGB", "NGS", "NIF", "OTH", "PEB", "PLM", "PMO",
)


def _read_and_check(path: str) -> tuple[bytes | None, str | None]:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    return None, f"cannot read: {e.strerror or e}"
  return raw, data_lib.check_image_bytes(raw)


# Run as ``python -m slamags_jax.data.tfds_cells`` this file is also ``__main__``; only the
# importable copy registers its builders with TFDS (names must be unique).
_REGISTER = __name__ != "__main__"


class CellFolder(tfds.core.GeneratorBasedBuilder, skip_registration=not _REGISTER):
  """Any cell folder: one sub-folder per class, images found recursively."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded image bytes, class label, relative path."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Point --manual_dir at a cell folder: one sub-folder per cell class, images (.jpg,
  .jpeg, .png, .bmp, .tif, .tiff) anywhere below it, e.g. `<class>/<name>.jpg`.
  """
  CLASS_NAMES: tuple[str, ...] | None = None  # None: the folder names of manual_dir

  def __init__(self, *, manual_dir: str | None = None, **kwargs: Any):
    """``manual_dir`` is needed to prepare (it fixes the class names); not to read."""
    self._source_dir = os.path.abspath(manual_dir) if manual_dir else None
    self._skipped: list[tuple[str, str]] = []
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # TFDS locates a builder's source file through importlib_resources (not a dependency
  # here, and not needed: there are no checksums to find); point it at this file.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def _find_root(cls, manual_dir: str) -> str:
    return manual_dir

  def _class_names(self) -> list[str] | None:
    if self.CLASS_NAMES is not None:
      return list(self.CLASS_NAMES)
    if self._source_dir is None:
      return None  # restored from the prepared dataset's label file
    return data_lib.class_folders(self._find_root(self._source_dir))

  def _info(self) -> tfds.core.DatasetInfo:
    names = self._class_names()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
            "label": tfds.features.ClassLabel(names=names) if names else tfds.features.ClassLabel(),
            "path": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
        description="Single-cell images of a cell folder, stored as encoded bytes.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._find_root(os.path.abspath(os.fspath(dl_manager.manual_dir)))
    return {"train": self._generate_examples(root)}

  def _generate_examples(self, root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    names = self.info.features["label"].names
    by_class = data_lib.discover(root, names)
    items = [(p, i) for i, c in enumerate(names) for p in by_class[c]]
    self._skipped = []
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
      for start in range(0, len(items), _CHUNK):
        chunk = items[start:start + _CHUNK]
        results = pool.map(_read_and_check, [os.path.join(root, p) for p, _ in chunk])
        for (path, label), (raw, problem) in zip(chunk, results):
          if problem is not None:
            logging.warning("tfds_cells: skipping unreadable file %s: %s", path, problem)
            self._skipped.append((path, problem))
            continue
          yield path, {"image": raw, "label": label, "path": path}
    logging.info("tfds_cells: %d files, %d unreadable skipped", len(items), len(self._skipped))
    self.info.metadata["root"] = root
    self.info.metadata["skipped"] = [list(s) for s in self._skipped]


class MatekBoneMarrow(CellFolder, skip_registration=not _REGISTER):
  """Matek et al. 2021 bone-marrow cytomorphology (TCIA), 21 classes."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the TCIA collection "Bone-Marrow-Cytomorphology_MLL_Helmholtz_Fraunhofer"
  (https://doi.org/10.7937/TCIA.AXH3-T579; Matek et al., Blood 2021; CC BY 4.0) and
  extract it. Point --manual_dir at the folder that holds the 21 class folders (ABE,
  ART, ..., PMO; layout `<CLASS>/<range>/<CLASS>_NNNNN.jpg`) or at its parent.
  """
  CLASS_NAMES = MATEK_CLASSES

  @classmethod
  def _find_root(cls, manual_dir: str) -> str:
    """manual_dir itself, or its one sub-folder that holds the class folders."""
    if os.path.isdir(os.path.join(manual_dir, cls.CLASS_NAMES[0])):
      return manual_dir
    subs = ([e.path for e in os.scandir(manual_dir) if e.is_dir() and not e.name.startswith(".")]
            if os.path.isdir(manual_dir) else [])
    hits = [s for s in subs if os.path.isdir(os.path.join(s, cls.CLASS_NAMES[0]))]
    return hits[0] if len(hits) == 1 else manual_dir

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info._info_proto.description = (
        "Matek et al. 2021: 171,374 expert-annotated bone-marrow cells (250x250 px "
        "JPEGs, May-Gruenwald-Giemsa), 21 classes. License: CC BY 4.0.")
    info._info_proto.citation = _CITATION_MATEK
    return info


BUILDERS = {"cell_folder": CellFolder, "matek_bone_marrow": MatekBoneMarrow}


def resolve_data_dir(tfds_data_dir: str, workdir: str) -> str:
  """``data.tfds_data_dir``, or ``<workdir>/tfds`` when it is empty."""
  return os.path.abspath(tfds_data_dir or os.path.join(workdir, "tfds"))


def prepare(manual_dir: str, data_dir: str, name: str = "cell_folder") -> tfds.core.DatasetBuilder:
  """Builds the dataset (once) and returns its builder.

  ``UserError`` when the folder is missing, or when ``data_dir`` already holds this
  dataset prepared from another folder.
  """
  if name not in BUILDERS:
    raise UserError(f"unknown TFDS builder {name!r}; choose from {', '.join(BUILDERS)}")
  manual_dir = os.path.abspath(manual_dir) if manual_dir else ""
  cls = BUILDERS[name]
  if not manual_dir or not os.path.isdir(manual_dir):
    # Already prepared? Then the folder is not needed.
    builder = cls(data_dir=data_dir)
    if builder.is_prepared():
      return builder
    if not manual_dir:
      raise UserError(f"no prepared TFDS {name!r} in {data_dir!r} and no data root to prepare it from (set data.root)")
    raise UserError(f"cannot prepare TFDS {name!r}: data root {manual_dir!r} does not exist")
  builder = cls(data_dir=data_dir, manual_dir=manual_dir)
  if builder.is_prepared():
    prepared_from = builder.info.metadata.get("root")
    expected = cls._find_root(manual_dir)
    if prepared_from and os.path.abspath(prepared_from) != expected:
      raise UserError(
          f"{builder.data_dir} holds {name!r} prepared from {prepared_from!r}, not from "
          f"{expected!r}: use another data.tfds_data_dir")
    return builder
  logging.info("tfds_cells: preparing %s from %s into %s", name, manual_dir, data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return cls(data_dir=data_dir)  # re-open read-only: metadata and label names from disk


def data_source(data_dir: str, name: str = "cell_folder", split: str = "train") -> Sequence[dict[str, Any]]:
  """Random-access records of a prepared dataset: dicts with image bytes, label, path."""
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


@dataclasses.dataclass
class CellIndex:
  """Record order of a prepared dataset: path and class of every record."""

  name: str
  classes: list[str]
  paths: list[str]
  labels: list[int]
  skipped: list[tuple[str, str]]

  def paths_of(self, class_name: str) -> list[str]:
    c = self.classes.index(class_name)
    return [p for p, lab in zip(self.paths, self.labels) if lab == c]

  def records_by_path(self) -> dict[str, int]:
    return {p: i for i, p in enumerate(self.paths)}


def _as_str(x: Any) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def index(builder: tfds.core.DatasetBuilder) -> CellIndex:
  """Path and label of every record, read once and cached next to the dataset."""
  cache = os.path.join(os.fspath(builder.data_dir), INDEX_FILE)
  if os.path.exists(cache):
    d = fileio.read_json(cache)
  else:
    source = builder.as_data_source(split="train")
    paths, labels = [], []
    for start in range(0, len(source), 1024):
      for rec in source.__getitems__(list(range(start, min(start + 1024, len(source))))):
        paths.append(_as_str(rec["path"]))
        labels.append(int(rec["label"]))
    d = {
        "name": builder.name,
        "classes": list(builder.info.features["label"].names),
        "paths": paths,
        "labels": labels,
        "skipped": [list(s) for s in builder.info.metadata.get("skipped", [])],
    }
    fileio.write_json(cache, d)
  return CellIndex(d["name"], d["classes"], d["paths"], d["labels"], [tuple(s) for s in d["skipped"]])


def prepare_and_index(manual_dir: str, data_dir: str, name: str = "cell_folder") -> CellIndex:
  """``prepare`` then ``index``: what the bags stage needs from a TFDS dataset."""
  return index(prepare(manual_dir, data_dir, name))


class RecordReader:
  """Encoded image bytes by record index; picklable (opens the source lazily per process)."""

  def __init__(self, data_dir: str, name: str = "cell_folder"):
    self.data_dir = data_dir
    self.name = name
    self._source = None

  def __getstate__(self) -> dict[str, Any]:
    return {"data_dir": self.data_dir, "name": self.name, "_source": None}

  def _open(self) -> Sequence[dict[str, Any]]:
    if self._source is None:
      self._source = data_source(self.data_dir, self.name)
    return self._source

  def __len__(self) -> int:
    return len(self._open())

  def read(self, record: int) -> bytes:
    rec = self._open()[int(record)]
    img = rec["image"]
    return img.item() if isinstance(img, np.ndarray) else bytes(img)

  def path(self, record: int) -> str:
    return _as_str(self._open()[int(record)]["path"])


@cli.guarded
def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags
  f = flags.FLAGS
  builder = prepare(f.manual_dir, f.data_dir, f.name)
  idx = index(builder)
  print(f"{builder.name}: {len(idx.paths)} records, {len(idx.classes)} classes, "
        f"{len(idx.skipped)} unreadable files skipped; in {builder.data_dir}")


if __name__ == "__main__":
  from absl import flags
  flags.DEFINE_string("manual_dir", None, "The cell folder (or the Matek TCIA folder).", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write the prepared dataset to.", required=True)
  flags.DEFINE_enum("name", "cell_folder", list(BUILDERS), "Which builder.")
  from slamags_jax.data import tfds_cells as _registered
  cli.run(_registered.main)
