"""A small slide set in the `bags.source=slides` layout, made from the in-repo PBC sample.

Slides are folders of copied PBC cells: label ``normal`` (lymphocytes and neutrophils),
``erb`` (normal cells plus erythroblasts, annotated in the cell-label CSV) and ``lym``
(mostly lymphocytes). Deterministic; a few hundred kilobytes.
"""

from __future__ import annotations

import csv
import os
import shutil

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_data", "pbc")


def _cells(name: str) -> list[str]:
  folder = os.path.join(SAMPLE, name)
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))


def make_slide_set(root: str, labels=("normal", "erb", "lym"), per_label: int = 4, cells: int = 8,
                   patients: bool = True) -> dict[str, str]:
  """Writes ``<root>/slides/<slide_id>/...jpg``, ``slides.csv`` and ``cell_labels.csv``; returns their paths."""
  lym, neu, erb = _cells("lymphocyte"), _cells("neutrophil"), _cells("erythroblast")
  pos = {"lymphocyte": 0, "neutrophil": 0, "erythroblast": 0}
  pools = {"lymphocyte": lym, "neutrophil": neu, "erythroblast": erb}

  def take(kind: str) -> str:
    p = pools[kind][pos[kind] % len(pools[kind])]
    pos[kind] += 1
    return p

  slides_dir = os.path.join(root, "slides")
  rows, annotations = [], []
  i = 0
  for label in labels:
    for j in range(per_label):
      sid = f"s{i:02d}"
      folder = os.path.join(slides_dir, sid, "cells")  # images found recursively
      os.makedirs(folder)
      if label == "erb":
        kinds = ["erythroblast"] * 3 + ["lymphocyte", "neutrophil"] * cells
      elif label == "lym":
        kinds = ["lymphocyte"] * (cells - 1) + ["neutrophil"] * cells
      else:
        kinds = ["neutrophil", "lymphocyte"] * cells
      for n, kind in enumerate(kinds[:cells]):
        src = take(kind)
        name = f"c{n:02d}_{os.path.basename(src)}"
        shutil.copyfile(src, os.path.join(folder, name))
        if label == "erb" and kind == "erythroblast":
          annotations.append((f"{sid}/cells/{name}", "erb"))
        elif label == "erb" and n == cells - 1:
          annotations.append((f"{sid}/cells/{name}", "normal"))
      patient = f"p{i // 2:02d}" if patients and j < 2 else f"p{i:02d}x"
      rows.append((sid, label, patient))
      i += 1
  csv_path = os.path.join(root, "slides.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["slide_id", "label", "patient_id"])
    w.writerows(rows)
  cell_csv = os.path.join(root, "cell_labels.csv")
  with open(cell_csv, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "label"])
    w.writerows(annotations)
  return {"root": slides_dir, "csv": csv_path, "cell_labels": cell_csv}


def tiny_overrides(paths: dict[str, str], negative: str = "normal") -> list[str]:
  """``--config.*`` flags for a few-second run on the slide set (tiny model, crops, epochs)."""
  return ["--config.bags.source=slides", f"--config.data.root={paths['root']}",
          f"--config.data.slides_csv={paths['csv']}", f"--config.data.negative_labels={negative}",
          f"--config.data.cell_labels_csv={paths['cell_labels']}",
          "--config.data.image_size=16", "--config.data.crop_size=16", "--config.model.width=4",
          "--config.model.head_dim=16", "--config.model.conv_impl=xla", "--config.pretrain.batch_size=8",
          "--config.pretrain.epochs=1",
          "--config.pretrain.probe_cells=0", "--config.embed.batch_size=32", "--config.mil.epochs=3",
          "--config.mil.hidden_dim=8", "--config.mil.attention_dim=4", "--config.report.gallery_max_cells=4",
          "--config.bags.folds=2", "--config.bags.val_fraction=0.34",
          # 12 slides: fold 1 has no validation carve that keeps every label in training, and
          # MIL no longer falls back to its last epoch silently.
          "--config.mil.selection=last_epoch"]
