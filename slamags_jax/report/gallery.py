"""The one cell gallery: top-ranked cells as thumbnails, witnesses framed in red (PIL, PNG bytes).

Used by the bag report (``topk_gallery.png``: one row per chosen positive test bag, with
the bag's numbers on the left), the slide report and ``predict`` (``gallery/<slide>.png``:
one slide's top cells, wrapped ``per_row`` to a line). Every thumbnail fits in
``THUMB_PX`` x ``THUMB_PX`` (96 px for both, formerly 72 px for slides); above it the rank
and attention, below it the cell's class or annotation when known. Needs no matplotlib.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import textwrap
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from slamags_jax import metrics
from slamags_jax.report import tables
from slamags_jax.runtime import fileio

THUMB_PX = 96
WITNESS_RGB = (214, 39, 40)  # red frame: true (or annotated) witness
NORMAL_RGB = (158, 158, 158)  # thin grey frame: any other cell
MISSING_RGB = (235, 235, 235)
LINE_PX = 18


@dataclasses.dataclass(frozen=True)
class Tile:
  """One cell of a gallery: its image, a caption above and below, whether it is a witness."""
  path: str
  above: str
  below: str = ""
  witness: bool = False


def thumbnail(path: str, px: int = THUMB_PX) -> Image.Image | None:
  """The image at ``path`` as RGB, fitted in ``px`` x ``px``; None when unreadable."""
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      im.thumbnail((px, px))
      return im.copy()
  except (OSError, ValueError):
    return None


def _font(size: int) -> Any:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ValueError, OSError):  # an old Pillow or one without FreeType: the bitmap font
    return ImageFont.load_default()


def _paste_tile(img: Image.Image, draw: ImageDraw.ImageDraw, tile: Tile, x: int, y: int, font: Any) -> None:
  draw.text((x, y), tile.above, fill="black", font=font)
  y += LINE_PX
  th = thumbnail(tile.path)
  if th is None:
    draw.rectangle([x, y, x + THUMB_PX, y + THUMB_PX], fill=MISSING_RGB)
    draw.text((x + 6, y + THUMB_PX // 2 - 8), "image missing", fill="black", font=font)
  else:
    img.paste(th, (x + (THUMB_PX - th.width) // 2, y + (THUMB_PX - th.height) // 2))
  if tile.witness:
    draw.rectangle([x - 3, y - 3, x + THUMB_PX + 2, y + THUMB_PX + 2], outline=WITNESS_RGB, width=3)
  else:
    draw.rectangle([x - 1, y - 1, x + THUMB_PX, y + THUMB_PX], outline=NORMAL_RGB, width=1)
  if tile.below:
    draw.text((x, y + THUMB_PX + 4), tile.below, fill=WITNESS_RGB if tile.witness else "black", font=font)


def gallery_png(title: str, rows: Sequence[tuple[str, Sequence[Tile]]], notes: Sequence[str] = (),
                per_row: int = 10) -> bytes:
  """Rows of tiles (each with a label on the left, possibly empty) under a title and notes, as PNG bytes."""
  font, big = _font(12), _font(15)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  label_w = max([measure.multiline_textbbox((0, 0), lab, font=font)[2] for lab, _ in rows if lab] or [-16]) + 16
  per_row = max(1, per_row)
  cols = max([min(per_row, len(t)) for _, t in rows] or [1])
  cell_w = THUMB_PX + 12
  cell_h = LINE_PX + THUMB_PX + (LINE_PX + 6 if any(t.below for _, ts in rows for t in ts) else 4) + 8
  lines = []  # (label, tiles of one line)
  for lab, tiles in rows:
    chunks = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)] or [[]]
    lines += [(lab if j == 0 else "", c) for j, c in enumerate(chunks)]
  heights = [max(cell_h, (lab.count("\n") + 1) * LINE_PX + 8 if lab else 0) for lab, _ in lines]
  top = 12 + 22 + LINE_PX * len(notes) + 8
  text_w = max([measure.textbbox((0, 0), title, font=big)[2]]
               + [measure.textbbox((0, 0), note, font=font)[2] for note in notes]) + 16
  width = max(420, 12 + label_w + cols * cell_w, text_w)
  img = Image.new("RGB", (width, top + sum(heights) + 8), "white")
  draw = ImageDraw.Draw(img)
  draw.text((8, 8), title, fill="black", font=big)
  for i, note in enumerate(notes):
    draw.text((8, 34 + i * LINE_PX), note, fill="#333333", font=font)
  y = top
  for (lab, tiles), h in zip(lines, heights):
    if lab:
      draw.multiline_text((8, y + 2), lab, fill="black", font=font, spacing=3)
    for j, tile in enumerate(tiles):
      _paste_tile(img, draw, tile, 8 + label_w + j * cell_w, y, font)
    y += h
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


# ----------------------------------------------------------------------------- simulated bags


def choose_bags(per_bag: Sequence[dict[str, Any]], n: int) -> list[int]:
  """Indices of ``n`` positive bags spread over the retrieval-AP range, best first."""
  if n <= 0 or not per_bag:
    return []
  aps = np.asarray([b["average_precision"] if math.isfinite(b["average_precision"]) else -1.0
                    for b in per_bag])
  order = np.argsort(-aps, kind="stable")
  picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
  return [int(order[i]) for i in picks]


def bag_gallery_png(bags: Sequence[dict[str, Any]], per_bag: Sequence[dict[str, Any]], root: str, k: int,
                    max_cells: int, title: str, abnormal_name: str) -> bytes:
  """``topk_gallery.png``: per joined positive bag (with its retrieval stats) its top cells in rank order."""
  if not bags:
    return gallery_png(title, [("No positive test bags: nothing to show.", [])])
  cols = max(1, min(max_cells, k, max(len(b["attention"]) for b in bags)))
  note = ("Cells in rank order of abnormal-class attention (value above each cell; the bag's attention "
          "sums to 1); true class below. Rows: positive test bags across the range of retrieval AP, best first.")
  if k > cols:
    note += f" Showing the top {cols} of the top {k}."
  notes = [f"Red frame: true witness ({abnormal_name}); grey frame: normal cell."] + textwrap.wrap(note, 130)
  rows = []
  for bag, stats in zip(bags, per_bag):
    order = metrics.stable_rank_order(bag["attention"])
    n = len(order)
    label = (f"{bag['id']}  ({n} cells)\np(abnormal) = {bag['prob']:.3f}\n"
             f"called: {'abnormal' if bag['pred'] else 'normal (missed)'}\n"
             f"top {min(k, n)}: {tables.found(stats['topk_found'])} of {stats['n_witnesses']} witnesses\n"
             f"retrieval AP {stats['average_precision']:.2f}")
    tiles = [Tile(os.path.join(root, bag["paths"][int(i)]), f"#{c + 1}  {bag['attention'][int(i)]:.3g}",
                  bag["classes"][int(i)][:14], bool(bag["instance_labels"][int(i)]))
             for c, i in enumerate(order[:min(cols, k, n)])]
    rows.append((label, tiles))
  return gallery_png(title, rows, notes, per_row=cols)


# ----------------------------------------------------------------------------- slides


def safe_name(slide_id: str) -> str:
  """A file name for a slide id (its folder name; other characters replaced)."""
  return re.sub(r"[^A-Za-z0-9._-]", "_", slide_id) or "slide"


def slide_gallery_png(root: str, slide: dict[str, Any], title: str, max_cells: int, per_row: int = 10) -> bytes:
  """The slide's top-ranked cells in rank order (rank and attention x n above each), as PNG bytes.

  Cells with ``witness`` set are framed red (annotated cells of the slide's label).
  """
  att = np.asarray(slide["attention"], np.float64)
  n = len(att)
  witness = slide.get("witness")
  tiles = [Tile(os.path.join(root, slide["paths"][int(i)]), f"#{j + 1} {att[int(i)] * n:.2g}",
                witness=bool(witness is not None and witness[int(i)]))
           for j, i in enumerate(metrics.stable_rank_order(att)[:max_cells])]
  return gallery_png(title, [("", tiles)], per_row=per_row)


def write_galleries(folder: str, root: str, slides: Sequence[dict[str, Any]], labels: Sequence[str],
                    max_cells: int) -> list[str]:
  """``<folder>/<slide>.png`` for every slide; returns the file names (relative to ``folder``'s parent)."""
  os.makedirs(folder, exist_ok=True)
  names = []
  for s in slides:
    called = labels[int(s["pred"])]
    truth = f" | label {labels[int(s['label'])]}" if s.get("label") is not None else ""
    title = (f"{s['id']} | called {called} (p={float(s['probs'][int(s['pred'])]):.3f}){truth} | "
             f"{len(s['attention'])} cells | top cells by attention (value x cells)")
    name = f"{safe_name(s['id'])}.png"
    fileio.write_bytes(os.path.join(folder, name), slide_gallery_png(root, s, title, max_cells))
    names.append(os.path.join(os.path.basename(folder), name))
  return names
