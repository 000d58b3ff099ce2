r"""Tables and plots of the PBC-ERB sweep, regenerated from runs.csv.

  python launch/pbc_erb_results.py
  python launch/pbc_erb_results.py --csv /tmp/runs.csv --out /tmp/pbc_erb_results   # development

Reads the runs table written by ``tools.pbc_erb.sweep``, keeps the rows of one
settings hash (by default the one ``configs/pbc_erb.py`` defines today, computed as the
sweep computes it; ``--settings-hash`` picks another) that came from committed code
(``--include-dirty`` to keep the others), and writes into ``--out``:

- ``README.md``: only the part between ``<!-- BEGIN GENERATED -->`` and
  ``<!-- END GENERATED -->`` is replaced, so hand-written text around it survives; a
  README without the markers is an error, a missing README starts from ``SKELETON``;
- ``f1_vs_wr.png`` and ``recall_vs_wr.png``: bag F1 and recall@K against the witness
  rate (log scale, falling to the right), one line per method, mean +- std over seeds.

``--tuning-table`` instead prints one Markdown line per settings hash of the CSV (the
keys that differ, pretraining time, scores pooled over all methods) for the tuning record.

Aggregation: per (method, witness rate), the mean and the sample standard deviation
(ddof = 1) over seeds; a seed recorded twice counts once (its latest row). Cells with
fewer than ``--min-seeds`` seeds are listed as a warning on stderr and in the README.
The output is a function of the CSV alone (no dates), so regenerating it unchanged gives
byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
import sys
from collections import Counter, defaultdict
from typing import Any, Sequence

import numpy as np

from slamags_jax import app
from slamags_jax.runtime import fileio
from slamags_jax.runtime.errors import UserError
from tools import REPO
from tools.pbc_erb import common
from tools.pbc_erb.aggregate import (
  METHOD_ORDER,
  aggregate,
  cells,
  mean_std,
  methods_of,
  missing_by_method,
  missing_cells,
  paired_difference,
  pct,
  select,
  to_float,
  wrs_of,
)

BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
DEFAULT_OUT = os.path.join(REPO, "results", "pbc_erb")

HIGHLIGHT = "slam_ags"
# Methods whose paired differences against every other method are tabulated.
PAIRED_AGAINST = ("slam_ags", "slam_ags_heads")
# (CSV column, title, digits) of the aggregated tables, in README order.
METRICS = (
    ("bag_f1", "Bag F1 (abnormal = positive)", 3),
    ("bag_auc", "Bag ROC-AUC", 3),
    ("recall_at_k_mean", "Recall@K of witnesses in positive test bags", 3),
    ("retrieval_ap_mean", "Average precision of the attention ranking (positive test bags)", 3),
    ("topk_found_mean", "Witnesses found in the top K (positive test bags)", 2),
    ("final_effective_rank", "Effective rank of the probe embeddings after pretraining (collapse monitor)", 1),
    ("conflict_fraction", "Conflict fraction: share of pretraining steps with cos(g_P, g_N) < 0", 3),
)
# Chance level of a metric: the column holding it, and how it is named.
CHANCE = {"recall_at_k_mean": "random_recall_at_k_mean", "retrieval_ap_mean": "random_ap_mean"}
PAIRED = ("bag_auc", "bag_f1", "recall_at_k_mean", "retrieval_ap_mean")

SKELETON = f"""# PBC-ERB results, CPU tier

Does slide-label-aware pretraining with adaptive gradient surgery (SLAM-AGS) find rare
abnormal cells better than the alternatives, and how does that change as the witness rate
falls? The protocol is `../shared/docs/benchmark.md` (PBC-ERB): real peripheral-blood cell
images, erythroblasts as the rare abnormal cells among the five leukocyte types, simulated
slides (bags) of 200 cells at witness rates 10, 5, 2, 1 and 0.5 %, six pretraining methods
with the same encoder, budget and downstream, at least 3 seeds each.

## Settings of the CPU tier

<!-- LEAD: replace this section after the tuning runs. -->
**Placeholder, to be written after the tuning runs:** the chosen width, epochs, learning
rate, batch size and warm-up, why (the tuning record is in the docstring of
`configs/pbc_erb.py`), and the pretraining time per run. The exact values every row was
produced with are listed in the generated section below ("Settings of these rows").

Fixed by the protocol: cells resized to 54 px, random 48 px crops for pretraining and a
centre crop for embedding; ResNet18 topology with a 512-512 projection head; 60/40
cell-level train/test split per class; 60 train bags (20 % of them validation bags for MIL
model selection) and 60 test bags, half positive; k = max(1, round(200 x WR)) witnesses per
positive bag; PAMIL (Adam, lr 1e-3, one bag per step); K = 20 for top-K retrieval.

## How to regenerate

From the repository root, at the commit named in the table below:

```
python launch/pbc_erb_sweep.py --methods slam_ags,weaksupcon,pcgrad,simclr,weakly,random \\
    --witness-rates 0.1,0.05,0.02,0.01,0.005 --seeds 0,1,2
python launch/pbc_erb_results.py
```

The sweep is resumable (re-running it runs only what `runs.csv` does not hold for the
current settings; an interrupted run continues from its completed stages and pretraining
checkpoint) and appends one row per run to `runs.csv`; the second command rewrites the
generated part of this file and the two plots from `runs.csv` alone.

What the commands enforce: the sweep refuses to run with uncommitted changes under
`slamags_jax/` or `configs/` (each row records its `commit`). A row counts only for the
settings it was made with: `settings_hash` covers every result-affecting config value
(listed in full in `settings/<hash>.json`) and the data's `SHA256SUMS`. Changing a value
in `configs/pbc_erb.py` therefore makes the next sweep run everything again, into new
workdirs, and this file shows the rows of the settings the config defines now. Workdirs
(not committed): `workdirs/pbc_erb/<hash>/<method>/wr<percent>/seed<seed>/`, each with its
`sweep.log`.

Tuning (once, at WR 10 %, every method with the same candidate settings; each candidate
is one settings hash, so the candidates share one CSV; a separate workdir root keeps the
benchmark's runs from reusing tuning workdirs):

```
python launch/pbc_erb_sweep.py --witness-rates 0.1 --seeds 0 --csv results/pbc_erb/tuning.csv \
    --workdir-root workdirs/pbc_erb_tuning --set model.width=16 --set pretrain.epochs=2 --set pretrain.lr=0.01
python launch/pbc_erb_results.py --csv results/pbc_erb/tuning.csv --tuning-table
```

`runs.csv` columns: `method, witness_rate` (fraction), `seed`, `bag_f1, bag_auc,
bag_accuracy` (test bags), `topk_k, topk_found_mean, recall_at_k_mean, retrieval_ap_mean`
(cell retrieval in positive test bags, mean over bags), `final_effective_rank` (probe
embeddings after pretraining), `conflict_fraction, mean_task_cosine` (share of
pretraining steps whose two task gradients had a negative cosine, and the mean cosine;
empty for single-task methods), `pretrain_wall_s, total_wall_s` (pretraining, and the
final invocation of the run command), `commit, machine`; then `settings_hash` (see
`settings/<hash>.json`), `dirty`, `stages_run` (stages the final invocation ran),
`invocations, total_wall_s_all` (all invocations of a resumed run), `earlier_commits`
(commits of earlier invocations of a run resumed across commits), `pretrain_steps`,
`random_recall_at_k_mean, random_ap_mean` (chance levels), `mil_best_epoch`,
`finished_utc`, `workdir`.

## Reading of the results

<!-- LEAD: replace this section once every cell has 3 seeds. -->
**Placeholder, to be written from the tables below once `runs.csv` holds every
(method, witness rate) cell with at least 3 seeds:** which method finds the erythroblasts
best at each witness rate, how the gap changes as the witness rate falls, where SLAM-AGS
does not win, and how large the differences are against the seed-to-seed spread.

{BEGIN}
{END}
"""


# ----------------------------------------------------------------------------- formatting

def fmt_ms(m: float, s: float, n: int, digits: int) -> str:
  if n == 0:
    return "n/a"
  text = f"{m:.{digits}f}"
  return f"{text} ± {s:.{digits}f}" if n > 1 else f"{text} (1 seed)"


def md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in body]
  return "\n".join(lines) + "\n"


def _name(method: str) -> str:
  return f"**{method}**" if method == HIGHLIGHT else f"`{method}`"


def metric_table(rows: Sequence[dict[str, str]], column: str, digits: int) -> str:
  methods, wrs = methods_of(rows), wrs_of(rows)
  agg = aggregate(rows, column)
  body = []
  for m in methods:
    body.append([_name(m)] + [fmt_ms(*agg.get((m, w), (math.nan, math.nan, 0)), digits) for w in wrs])
  if column in CHANCE:
    chance = aggregate(rows, CHANCE[column])
    by_wr = {w: mean_std([chance[k][0] for k in chance if k[1] == w and chance[k][2]])[0] for w in wrs}
    body.append(["chance"] + [f"{by_wr[w]:.{digits}f}" if math.isfinite(by_wr[w]) else "n/a" for w in wrs])
  return md_table(["method"] + [f"WR {pct(w)}" for w in wrs], body)


def generated_block(rows: Sequence[dict[str, str]], info: dict[str, Any], *, digest: str | None,
                    settings: dict[str, Any] | None, min_seeds: int, plots: Sequence[str], csv_name: str) -> str:
  """The Markdown between the markers: coverage, plots, tables, paired differences, provenance."""
  md = [f"_Generated by `python launch/pbc_erb_results.py` from `{csv_name}`; do not edit by hand._\n"]
  skipped = []
  if info["other_hashes"]:
    skipped.append(", ".join(f"{n} of settings `{h or '?'}`" for h, n in sorted(info["other_hashes"].items())))
  if info["dirty_left_out"]:
    skipped.append(f"{info['dirty_left_out']} from uncommitted code (dirty)")
  if info["duplicates"]:
    skipped.append(f"{info['duplicates']} repeated (method, WR, seed) (the latest row kept)")
  md.append(f"Rows used: {len(rows)} (settings `{_digest_label(digest)}`)."
            + (f" Left out: {'; '.join(skipped)}." if skipped else "") + "\n")
  if not rows:
    md.append("\nNo runs recorded yet for these settings.\n")
    return "".join(md)

  methods, wrs = methods_of(rows), wrs_of(rows)
  seeds_per = {k: len({int(r["seed"]) for r in rs}) for k, rs in cells(rows).items()}
  md.append("\n### Seeds per cell\n\n")
  md.append(md_table(["method"] + [f"WR {pct(w)}" for w in wrs],
                     [[_name(m)] + [str(seeds_per.get((m, w), 0)) for w in wrs] for m in methods]))
  missing = missing_cells(rows, min_seeds)
  if missing:
    md.append(f"\n**Incomplete: {len(missing)} protocol cell(s) with fewer than {min_seeds} seeds** "
              "(witness rate: seeds):\n\n")
    md.extend(f"- `{m}`: {cells_text}\n" for m, cells_text in missing_by_method(missing))
  else:
    md.append(f"\nEvery protocol cell ({len(METHOD_ORDER)} methods x {len(common.WITNESS_RATES)} witness rates) "
              f"has at least {min_seeds} seeds.\n")

  if plots:
    md.append("\n### Plots\n\n")
    md.extend(f"![{p}]({p})\n" for p in plots)
  md.append("\nMean ± sample standard deviation over seeds (\"(1 seed)\": no spread yet). "
            "K of the retrieval metrics: " + ", ".join(sorted({r['topk_k'] for r in rows})) + ".\n")
  for column, title, digits in METRICS:
    md.append(f"\n### {title}\n\n")
    md.append(metric_table(rows, column, digits))

  for a in PAIRED_AGAINST:
    md.append(f"\n### `{a}` minus each other method (paired by seed: same bags)\n\n"
              f"Mean ± std over the seeds both have of ({a} − method); positive: {a} higher.\n")
    if a not in methods:
      md.append(f"\nNo {a} rows.\n")
      continue
    for column in PAIRED:
      title = next(t for c, t, _ in METRICS if c == column)
      body = [[f"`{m}`"] + [fmt_ms(*paired_difference(rows, column, a, m, w), 3) for w in wrs]
              for m in methods if m != a]
      md.append(f"\n{title}:\n\n" + md_table(["vs"] + [f"WR {pct(w)}" for w in wrs], body))

  md += _cost_and_provenance(rows, methods)
  md += _settings_section(digest, settings, methods)
  return "".join(md)


def _cost_and_provenance(rows: Sequence[dict[str, str]], methods: Sequence[str]) -> list[str]:
  """The Cost and Provenance sections of the generated block."""
  md: list[str] = []
  md.append("\n### Cost\n\n")
  body = []
  for m in methods:
    rs = [r for r in rows if r["method"] == m]
    steps = sorted({r.get("pretrain_steps", "") for r in rs} - {""}, key=to_float)
    body.append([_name(m), ", ".join(steps) or "n/a",
                 fmt_ms(*mean_std([to_float(r.get("pretrain_wall_s")) for r in rs]), 0),
                 fmt_ms(*mean_std([to_float(r.get("total_wall_s")) for r in rs]), 0),
                 str(sum(1 for r in rs if to_float(r.get("invocations")) > 1))])
  md.append(md_table(["method", "pretraining steps", "pretraining wall s", "run wall s (final invocation)",
                      "resumed runs"], body))

  md.append("\n### Provenance\n\n")
  commits, machines = Counter(r["commit"] for r in rows), Counter(r["machine"] for r in rows)
  md.append(md_table(["commit", "rows"], [[f"`{c}`", str(n)] for c, n in sorted(commits.items())]))
  md.append("\n" + md_table(["machine", "rows"], [[m, str(n)] for m, n in sorted(machines.items())]))
  if len(commits) > 1:
    md.append("\n**The rows come from more than one commit.**\n")
  mixed = [r for r in rows if r.get("earlier_commits")]
  if mixed:
    md.append(f"\n**{len(mixed)} run(s) were resumed across commits** (stages made by an earlier commit): "
              + ", ".join(f"{r['method']} @ {pct(r['witness_rate'])} seed {r['seed']} ({r['earlier_commits']})"
                          for r in mixed) + ".\n")

  return md


def _settings_section(digest: str | dict[str, str] | None, settings: dict[str, Any] | None,
                      methods: Sequence[str]) -> list[str]:
  """The Settings section: the chosen setting per method (with a selection), then every result-affecting key."""
  md: list[str] = []
  md.append("\n### Settings of these rows\n\n")
  per_method = settings if isinstance(digest, dict) else {None: settings}
  if isinstance(digest, dict):
    md.append("Each method with the setting it chose on the validation bags (`selection.json`, "
              "`selection.md`):\n\n")
    md.append(md_table(["method", "chosen", "settings hash"],
                       [[f"`{m}`", f"`{' '.join((per_method.get(m) or {}).get('overrides', [])) or '-'}`",
                         f"`{digest[m]}`"] for m in methods if m in digest]))
    md.append("\n")
  first = next((v for v in per_method.values() if v), None)
  if first:
    s = first.get("settings", {})
    varying = sorted({k for v in per_method.values() if v for k, x in v.get("settings", {}).items() if s.get(k) != x})
    label = f"`{digest}`" if not isinstance(digest, dict) else "of every method"
    md.append(f"Settings {label}: config `{first.get('config', '?')}`"
              + (f" with `{' '.join(first['overrides'])}`" if first.get("overrides") and not isinstance(digest, dict)
                 else "")
              + f", data `{first.get('data_root', '?')}`. Per run: `seed`, `pretrain.method`, `bags.witness_rate`."
              + (f" Differing between methods: {', '.join(f'`{k}`' for k in varying)} (shown for "
                 f"`{next(m for m, v in per_method.items() if v is first)}`)." if varying else "")
              + "\n\n<details><summary>Every result-affecting key</summary>\n\n")
    md.append(md_table(["key", "value"], [[f"`{k}`", f"`{v}`"] for k, v in sorted(s.items())]))
    md.append("\n</details>\n")
  else:
    md.append(f"`settings/{digest}.json` not found.\n")
  return md


def _digest_label(digest: str | dict[str, str] | None) -> str:
  return "per method, selection.json" if isinstance(digest, dict) else (digest or "all")


def replace_generated(readme: str, block: str) -> str:
  """The README with the text between the markers replaced by ``block``."""
  pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
  if len(pattern.findall(readme)) != 1:
    raise UserError(f"the README must hold exactly one {BEGIN} ... {END} pair")
  return pattern.sub(lambda _: f"{BEGIN}\n{block.rstrip()}\n{END}", readme)


def tuning_table(rows: Sequence[dict[str, str]], settings: dict[str, dict[str, Any] | None]) -> str:
  """One line per settings hash: the keys that differ between hashes, cost and scores pooled over methods.

  For the tuning record (configs/pbc_erb.py): every method is run with each candidate setting
  and a setting is judged on all methods together, never per method.
  """
  by_hash: dict[str, list[dict[str, str]]] = defaultdict(list)
  for r in rows:
    by_hash[r.get("settings_hash", "")].append(r)
  flat = {h: (settings.get(h) or {}).get("settings", {}) for h in by_hash}
  keys = sorted({k for s in flat.values() for k in s})
  differing = [k for k in keys if len({repr(s.get(k)) for s in flat.values()}) > 1]
  body = []
  for h, rs in sorted(by_hash.items(), key=lambda kv: min(r.get("finished_utc", "") for r in kv[1])):
    what = ", ".join(f"{k}={flat[h].get(k)}" for k in differing) or ("(settings file missing)" if not flat[h] else "-")
    wall = [to_float(r.get("pretrain_wall_s")) for r in rs]
    stat = lambda c: fmt_ms(*mean_std([to_float(r.get(c)) for r in rs]), 3)  # noqa: E731
    body.append([f"`{h}`", what, f"{len(rs)} ({', '.join(methods_of(rs))})",
                 f"{np.nanmean(wall):.0f} / {np.nanmax(wall):.0f}" if np.isfinite(wall).any() else "n/a",
                 stat("bag_f1"), stat("recall_at_k_mean"), stat("retrieval_ap_mean")])
  return md_table(["settings", "what differs", "runs (methods)", "pretraining s (mean / max)",
                   "bag F1 (all runs)", "recall@K (all runs)", "AP (all runs)"], body)


# ----------------------------------------------------------------------------- plots

def wr_figure(rows: Sequence[dict[str, str]], column: str, ylabel: str, title: str) -> bytes:
  """One line per method (mean ± std over seeds) against the witness rate; PNG bytes."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import FixedLocator, NullLocator
  methods, wrs = methods_of(rows), wrs_of(rows)
  agg = aggregate(rows, column)
  fig = Figure(figsize=(8.4, 4.6), dpi=120)
  ax = fig.add_subplot(1, 1, 1)
  colours = {"slam_ags": "#d62728", "weaksupcon": "#1f77b4", "pcgrad": "#9467bd", "simclr": "#2ca02c",
             "weakly": "#ff7f0e", "random": "#7f7f7f"}
  n_m = max(1, len(methods))
  for i, m in enumerate(methods):
    pts = [(float(w) * 100, *agg[(m, w)]) for w in wrs if (m, w) in agg and agg[(m, w)][2]]
    if not pts:
      continue
    x = np.array([p[0] for p in pts]) * 1.035 ** (i - (n_m - 1) / 2)  # dodge, so error bars do not overlap
    y = np.array([p[1] for p in pts])
    e = np.nan_to_num(np.array([p[2] for p in pts]))
    main = m == HIGHLIGHT
    ns = sorted({p[3] for p in pts})
    label = f"{m} (n={ns[0]})" if len(ns) == 1 else f"{m} (n={ns[0]}-{ns[-1]})"  # seeds per point
    ax.errorbar(x, y, yerr=e, label=label, color=colours.get(m), lw=2.6 if main else 1.4,
                marker="o" if main else "s", ms=6 if main else 4, capsize=3, alpha=1.0 if main else 0.85,
                zorder=5 if main else 3)
  if column in CHANCE:
    chance = aggregate(rows, CHANCE[column])
    cx, cy = [], []
    for w in wrs:
      v = [chance[k][0] for k in chance if k[1] == w and chance[k][2]]
      if v:
        cx.append(float(w) * 100)
        cy.append(float(np.mean(v)))
    if cx:
      ax.plot(cx, cy, ls="--", color="black", lw=1, label="chance (random ranking)", zorder=2)
  ax.set_xscale("log")
  ticks = [float(w) * 100 for w in wrs]
  ax.xaxis.set_major_locator(FixedLocator(ticks))
  ax.xaxis.set_minor_locator(NullLocator())
  ax.set_xticklabels([f"{t:g}" for t in ticks])
  if ticks:
    ax.set_xlim(max(ticks) * 1.35, min(ticks) / 1.35)  # falling witness rate to the right
  ax.set_xlabel("witness rate (% abnormal cells in a positive bag; log scale, harder to the right)")
  ax.set_ylabel(ylabel)
  ax.set_ylim(-0.02, 1.02)
  ax.grid(True, alpha=0.3)
  ax.set_title(title, fontsize=10)
  handles, labels = ax.get_legend_handles_labels()
  order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("chance"))  # methods first
  ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title="method (seeds)", title_fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


# ----------------------------------------------------------------------------- command

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--csv", default=common.DEFAULT_CSV, help="runs table (default: results/pbc_erb/runs.csv)")
  p.add_argument("--out", default=DEFAULT_OUT, help="folder of README.md and the plots (default: results/pbc_erb)")
  p.add_argument("--config", default=common.DEFAULT_CONFIG, help="config whose settings hash is reported")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for the sweep (repeatable)")
  p.add_argument("--settings-hash", default=None, help="report this settings hash instead of the config's; "
                                                         "'all' mixes every hash (development only)")
  p.add_argument("--selection", default=None, metavar="JSON",
                 help="report each method's chosen settings hash from this selection (default: "
                      "selection.json beside --csv when it exists and neither --set nor --settings-hash is given; "
                      "'' to use the config's hash)")
  p.add_argument("--include-dirty", action="store_true", help="keep rows from uncommitted code")
  p.add_argument("--min-seeds", type=int, default=3, help="seeds each (method, WR) cell needs (default: 3)")
  p.add_argument("--tuning-table", action="store_true",
                 help="print a Markdown table comparing the settings hashes in --csv (pooled over methods) and exit; "
                      "for the tuning record; writes nothing")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  warn = lambda m: sys.stderr.write(f"warning: {m}\n")  # noqa: E731
  if args.tuning_table:
    try:
      all_rows = common.read_rows(args.csv, warn)
    except UserError as e:
      sys.stderr.write(app.error_line(e))
      return 2
    kept = [r for r in all_rows if args.include_dirty or r.get("dirty", "0") in ("", "0")]
    hashes = {r.get("settings_hash", "") for r in kept}
    sys.stdout.write(tuning_table(kept, {h: common.read_settings(args.csv, h) for h in hashes}))
    return 0
  try:
    selection = args.selection
    if selection is None:
      default = os.path.join(os.path.dirname(os.path.abspath(args.csv)), "selection.json")
      selection = default if os.path.exists(default) and not args.settings_hash and not args.set else ""
    if args.settings_hash:
      digest = None if args.settings_hash == "all" else args.settings_hash
    elif selection:
      sel = common.load_selection(selection)
      digest = {m: rec["settings_hash"] for m, rec in sel["methods"].items() if rec.get("chosen")}
    else:
      cfg = common.load_config(os.path.abspath(args.config), common.parse_set(args.set))
      digest = common.settings_hash(common.settings_of(cfg))
    all_rows = common.read_rows(args.csv, warn)
    rows, info = select(all_rows, digest, args.include_dirty)
    if all_rows and not rows:
      hashes = Counter(r.get("settings_hash", "") for r in all_rows)
      raise UserError(f"no usable rows of settings {digest} in {args.csv} (rows per hash: "
                      + ", ".join(f"{h}: {n}" for h, n in sorted(hashes.items()))
                      + "); pick one with --settings-hash, or --include-dirty for development rows")
    out = os.path.abspath(args.out)
    readme_path = os.path.join(out, "README.md")
    readme = SKELETON
    if os.path.exists(readme_path):
      with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    plots = []
    if rows:
      k = sorted({r["topk_k"] for r in rows})
      n = f"mean ± std over seeds; settings {_digest_label(digest)}"
      fileio.write_bytes(os.path.join(out, "f1_vs_wr.png"), wr_figure(
          rows, "bag_f1", "bag F1 on the test bags", f"PBC-ERB (CPU tier): bag F1 against witness rate\n{n}"))
      fileio.write_bytes(os.path.join(out, "recall_vs_wr.png"), wr_figure(
          rows, "recall_at_k_mean", f"recall@K of witnesses (K = {', '.join(k)})",
          f"PBC-ERB (CPU tier): witness recall@K in positive test bags\n{n}"))
      plots = ["f1_vs_wr.png", "recall_vs_wr.png"]
    if isinstance(digest, dict):
      settings = {m: common.read_settings(args.csv, h) for m, h in digest.items()}
    else:
      settings = common.read_settings(args.csv, digest) if digest else None
    block = generated_block(rows, info, digest=digest, settings=settings, min_seeds=args.min_seeds, plots=plots,
                            csv_name=os.path.basename(args.csv))
    fileio.write_text(readme_path, replace_generated(readme, block))
  except (UserError, ValueError) as e:
    sys.stderr.write(app.error_line(e))
    return 2
  missing = missing_cells(rows, args.min_seeds)
  if missing:
    warn(f"{len(missing)} (method, WR) cell(s) with fewer than {args.min_seeds} seeds (witness rate: seeds):\n"
         + "".join(f"  {m}: {text}\n" for m, text in missing_by_method(missing)).rstrip())
  print(f"{len(rows)} rows -> {readme_path}" + (f", {', '.join(plots)}" if plots else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
