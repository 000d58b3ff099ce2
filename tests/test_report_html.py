"""report/html.py: the self-contained review page, checked in a real headless browser (Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from slamags_jax.report import html as report_html

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample_data", "pbc")
LABELS = ["AML", "APL"]

# Appended to a copy of the page (the page itself has no script): counts what rendered.
_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var d = document.createElement('div');
  d.id = 'check';
  d.textContent = 'cards=' + document.querySelectorAll('.card').length + ';images=' + imgs.length +
      ';broken=' + broken + ';svg=' + document.querySelectorAll('svg').length;
  document.body.appendChild(d);
});
</script>"""


def _browser() -> str | None:
  for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
    path = shutil.which(name)
    if path:
      return path
  return None


def _slides(n=6, cells=5, seed=0):
  rng = np.random.default_rng(seed)
  paths = sorted(os.path.join(kind, f) for kind in ("lymphocyte", "erythroblast")
                 for f in os.listdir(os.path.join(SAMPLE, kind)) if f.endswith(".jpg"))[: n * cells]
  out = []
  for i in range(n):
    p = float(rng.random())
    att = rng.random(cells)
    if i % 2:
      att[0] = 10.0  # the annotated witness ranks first
    out.append({"id": f"Patient_{i:02d}", "label": i % 2, "probs": [1 - p, p], "attention": att / att.sum(),
                "paths": paths[i * cells:(i + 1) * cells], "witness": [j == 0 and i % 2 == 1 for j in range(cells)]})
  out[0]["paths"][1] = "lymphocyte/missing.jpg"  # an unreadable cell becomes a grey square, not a broken image
  return out


def test_page_is_self_contained_one_card_per_slide_ordered_by_probability(tmp_path):
  slides = _slides()
  path = report_html.write(str(tmp_path / "report.html"), SAMPLE, slides, LABELS, title="t", max_cells=3)
  text = open(path, encoding="utf-8").read()
  assert text.count('class="card') == len(slides)
  assert not re.search(r'(src|href)="(?!data:)', text), "every resource is inline"
  assert "<script" not in text and "ROC-AUC" in text and "Confusion matrix" in text and "95 % CI" in text
  order = re.findall(r'data-slide="([^"]+)"', text)
  p = {s["id"]: s["probs"][1] for s in slides}
  assert [p[i] for i in order] == sorted(p.values(), reverse=True)
  assert text.count('class="cell witness"') == sum(1 for s in slides if s["label"] == 1)  # framed red
  # Without labels (predict): no ROC, no confusion matrix; still one card per slide.
  for s in slides:
    s["label"] = None
  text = report_html.page(SAMPLE, slides, LABELS, title="new slides")
  assert text.count('class="card') == len(slides) and "Confusion matrix" not in text and "ROC-AUC" not in text


def test_page_renders_in_headless_chromium(tmp_path):
  browser = _browser()
  if browser is None:
    pytest.skip("no Chromium on this machine (apt-get install chromium); the CI installs it")
  slides = _slides(n=8)
  page = report_html.page(SAMPLE, slides, LABELS, title="headless check", max_cells=4)
  checked = tmp_path / "checked.html"
  checked.write_text(page.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
  cards, images, broken, svg = _render(browser, checked)
  assert cards == len(slides) and images == len(slides) * 4 and broken == 0 and svg == 2
  # The check itself sees a broken image.
  checked.write_text(page.replace("</body>", '<img src="data:image/jpeg;base64,AAAA">' + _CHECK + "</body>"),
                     encoding="utf-8")
  assert _render(browser, checked)[2] == 1


def _render(browser, path):
  proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--virtual-time-budget=10000", "--dump-dom", path.as_uri()],
                        capture_output=True, text=True, timeout=120)
  m = re.search(r'<div id="check">cards=(\d+);images=(\d+);broken=(\d+);svg=(\d+)</div>', proc.stdout)
  assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
  return tuple(map(int, m.groups()))
