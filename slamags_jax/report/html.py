"""``report.html``: one self-contained review page for hematologists (report stage and ``predict``).

Opens offline from the workdir: no script, no external file; every cell image is inlined
as a base64 data URI and the curves are inline SVG. On top: the patient-level ROC with
its 95 % interval and the confusion matrix (when the true labels are known), then the
reliability of the probabilities; then one card per slide, ordered by probability (of
the abnormal class for two labels, of the called label for more, highest first): the
called label and every class probability, the true label where known (a wrong call is
marked), and the slide's top cells by attention (rank, attention x cells), annotated
witnesses framed red.

``write(path, root, slides, labels, ...)``: ``slides`` are dicts with ``id``, ``probs``
(class probabilities), ``attention`` [n], ``paths`` (relative to ``root``), and
optionally ``label`` (true class index or None) and ``witness`` [n] (bool).
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from slamags_jax import metrics
from slamags_jax.runtime import fileio

THUMB_PX = 72
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222;max-width:1200px}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.4em}
.top{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
table.cm{border-collapse:collapse} table.cm td,table.cm th{border:1px solid #bbb;padding:4px 10px;text-align:center}
.card{border:1px solid #ccc;border-radius:6px;padding:8px 10px;margin:10px 0}
.card.wrong{border-color:#d62728;border-width:2px}
.hdr{display:flex;flex-wrap:wrap;gap:16px;align-items:baseline}
.sid{font-weight:600;font-size:1.05em} .called{font-weight:600}
.bar{display:inline-block;height:10px;background:#1f77b4;vertical-align:middle}
.barbox{display:inline-block;width:120px;background:#eee;vertical-align:middle;margin:0 6px}
.cells{display:flex;flex-wrap:wrap;gap:4px;margin-top:6px}
figure{margin:0;text-align:center;font-size:11px}
figure img{display:block;border:3px solid transparent}
figure.witness img{border-color:#d62728}
.note{color:#555;font-size:0.9em}
"""


def _thumb_uri(path: str) -> str:
  """The cell as a small JPEG data URI (a grey square when the file does not decode)."""
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      im.thumbnail((THUMB_PX, THUMB_PX))
      im = im.copy()
  except (OSError, ValueError):
    im = Image.new("RGB", (THUMB_PX, THUMB_PX), (235, 235, 235))
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=85)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def roc_points(y: Sequence[int], score: Sequence[float]) -> list[tuple[float, float]]:
  """(FPR, TPR) of the ROC curve, ties stepped together, from (0, 0) to (1, 1)."""
  y = np.asarray(y, bool)
  s = np.asarray(score, np.float64)
  p, n = int(y.sum()), int((~y).sum())
  if not p or not n:
    return [(0.0, 0.0), (1.0, 1.0)]
  pts = [(0.0, 0.0)]
  tp = fp = 0
  for v in np.unique(s)[::-1]:
    sel = s == v
    tp += int(y[sel].sum())
    fp += int((~y[sel]).sum())
    pts.append((fp / n, tp / p))
  return pts


def _svg_plot(series: Sequence[tuple[list[tuple[float, float]], str, str]], xlabel: str, ylabel: str,
              diagonal: bool = True, size: int = 260) -> str:
  """A unit-square line plot as inline SVG: ``series`` = [(points, colour, style)], style 'line' or 'dots'."""
  m = 36
  w = size + m + 10

  def xy(x: float, y: float) -> str:
    return f"{m + x * size:.1f},{10 + (1 - y) * size:.1f}"
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{size + m + 10}" role="img">',
           f'<rect x="{m}" y="10" width="{size}" height="{size}" fill="white" stroke="#888"/>']
  for t in (0.25, 0.5, 0.75):
    parts.append(f'<line x1="{m + t * size}" y1="10" x2="{m + t * size}" y2="{10 + size}" stroke="#eee"/>')
    parts.append(f'<line x1="{m}" y1="{10 + t * size}" x2="{m + size}" y2="{10 + t * size}" stroke="#eee"/>')
  if diagonal:
    parts.append(f'<line x1="{m}" y1="{10 + size}" x2="{m + size}" y2="10" stroke="#aaa" stroke-dasharray="4,3"/>')
  for pts, colour, style in series:
    if style == "dots":
      parts += [f'<circle cx="{xy(x, y).split(",")[0]}" cy="{xy(x, y).split(",")[1]}" r="{r}" fill="{colour}"/>'
                for x, y, r in pts]  # type: ignore[misc]
    else:
      parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                   + " ".join(xy(x, y) for x, y in pts) + '"/>')
  parts.append(f'<text x="{m + size / 2}" y="{size + m + 4}" font-size="11" text-anchor="middle">'
               f'{html.escape(xlabel)}</text>')
  parts.append(f'<text x="10" y="{10 + size / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 10 {10 + size / 2})">{html.escape(ylabel)}</text>')
  for t in (0.0, 0.5, 1.0):
    parts.append(f'<text x="{m + t * size}" y="{size + 22}" font-size="9" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{m - 4}" y="{13 + (1 - t) * size}" font-size="9" text-anchor="end">{t:g}</text>')
  parts.append("</svg>")
  return "".join(parts)


def _order(slides: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[int]:
  if len(labels) == 2:
    key = [float(s["probs"][1]) for s in slides]
  else:
    key = [float(np.max(s["probs"])) for s in slides]
  return sorted(range(len(slides)), key=lambda i: (-key[i], str(slides[i]["id"])))


def _card(root: str, s: dict[str, Any], labels: Sequence[str], max_cells: int) -> str:
  probs = np.asarray(s["probs"], np.float64)
  called = int(np.argmax(probs))
  truth = s.get("label")
  wrong = truth is not None and int(truth) != called
  att = np.asarray(s["attention"], np.float64)
  n = len(att)
  order = metrics.stable_rank_order(att)[:max_cells]
  witness = s.get("witness")
  bars = "".join(f'<span>{html.escape(labels[c])}<span class="barbox"><span class="bar" style="width:'
                 f'{100 * probs[c]:.1f}%"></span></span>{probs[c]:.3f}</span> ' for c in range(len(labels)))
  truth_html = "" if truth is None else (
      f'<span>true label: <b>{html.escape(labels[int(truth)])}</b>{" (wrong call)" if wrong else ""}</span>')
  n_wit = int(np.sum(witness)) if witness is not None else 0
  figs = []
  for j, i in enumerate(order):
    w = witness is not None and bool(witness[int(i)])
    cap = f"#{j + 1} {att[int(i)] * n:.2g}" + (" &#9733;" if w else "")
    uri = _thumb_uri(os.path.join(root, s["paths"][int(i)]))
    figs.append(f'<figure class="cell{" witness" if w else ""}"><img src="{uri}"'
                f' width="{THUMB_PX}" height="{THUMB_PX}" alt="cell {j + 1} of slide {html.escape(str(s["id"]))}">'
                f"<figcaption>{cap}</figcaption></figure>")
  return (f'<div class="card{" wrong" if wrong else ""}" data-slide="{html.escape(str(s["id"]))}">'
          f'<div class="hdr"><span class="sid">{html.escape(str(s["id"]))}</span>'
          f'<span>called: <span class="called">{html.escape(labels[called])}</span></span>{truth_html}'
          f'<span class="note">{n} cells{f", {n_wit} annotated witnesses (framed red)" if n_wit else ""}</span></div>'
          f'<div>{bars}</div><div class="cells">{"".join(figs)}</div></div>')


def page(root: str, slides: Sequence[dict[str, Any]], labels: Sequence[str], *, title: str,
         summary: dict[str, Any] | None = None, max_cells: int = 20, notes: Sequence[str] = ()) -> str:
  """The page's HTML text (see the module docstring)."""
  summary = summary or {}
  known = [s for s in slides if s.get("label") is not None]
  top = []
  if known and len(labels) == 2 and len({int(s["label"]) for s in known}) == 2:
    y = [int(s["label"]) for s in known]
    score = [float(s["probs"][1]) for s in known]
    auc = summary.get("bag_auc")
    ci = summary.get("bag_auc_ci95")
    if auc is None:
      from slamags_jax.report import uncertainty
      d = uncertainty.delong_auc(y, score)
      auc, ci = d["auc"], d["ci95"]
    ci_text = f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f}, {html.escape(summary.get('bag_auc_ci_method') or 'DeLong')})" \
        if ci else ""
    top.append(f'<div><h2>ROC ({labels[1]} vs {labels[0]}, {len(known)} slides)</h2>'
               + _svg_plot([(roc_points(y, score), "#1f77b4", "line")], "false positive rate", "true positive rate")
               + f"<p>ROC-AUC <b>{auc:.3f}</b>{ci_text}</p></div>")
    from slamags_jax.report import uncertainty
    bins = uncertainty.reliability_bins(np.asarray(y) == 1, score)
    pts = [(b["mean_p"], b["observed"], 2 + 6 * (b["n"] / len(y)) ** 0.5) for b in bins if b["n"]]
    top.append(f'<div><h2>Reliability (p({html.escape(labels[1])}) vs observed)</h2>'
               + _svg_plot([([(p[0], p[1]) for p in pts], "#ff7f0e", "line"), (pts, "#ff7f0e", "dots")],
                           f"mean predicted p({labels[1]})", f"observed share {labels[1]}")
               + f"<p>Brier score {uncertainty.brier(y, [s['probs'] for s in known]):.3f} (0 is perfect)</p></div>")
  if known:
    cm = np.zeros((len(labels), len(labels)), np.int64)
    for s in known:
      cm[int(s["label"]), int(np.argmax(s["probs"]))] += 1
    rows = "".join(f"<tr><th>{html.escape(labels[r])}</th>"
                   + "".join(f"<td>{cm[r, c]}</td>" for c in range(len(labels))) + "</tr>" for r in range(len(labels)))
    top.append('<div><h2>Confusion matrix</h2><table class="cm"><tr><th>true \\ called</th>'
               + "".join(f"<th>{html.escape(n)}</th>" for n in labels) + f"</tr>{rows}</table>"
               f'<p class="note">accuracy {np.trace(cm) / max(cm.sum(), 1):.3f} on {int(cm.sum())} slides</p></div>')
  order = _order(slides, labels)
  cards = "".join(_card(root, slides[i], labels, max_cells) for i in order)
  note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
  sort_text = (f"p({labels[1]})" if len(labels) == 2 else "the called label's probability")
  return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
          f"<h1>{html.escape(title)}</h1>{note_html}"
          f'<div class="top">{"".join(top)}</div>'
          f"<h2>Slides ({len(slides)}), ordered by {html.escape(sort_text)}, highest first</h2>"
          f'<p class="note">Each card: the called label and every class probability; the slide\'s top cells by '
          f"attention (rank, attention x cells; annotated witnesses framed red, &#9733;).</p>"
          f"{cards}</body></html>")


def write(path: str, root: str, slides: Sequence[dict[str, Any]], labels: Sequence[str], **kwargs: Any) -> str:
  """Writes ``page(...)`` to ``path`` (atomically); returns the path."""
  fileio.write_text(path, page(root, slides, labels, **kwargs))
  return path
