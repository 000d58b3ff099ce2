"""The one registry of pretraining methods: their tasks, gradient combination and views.

Light on purpose (no jax): ``config`` reads the names for its checks and schema, and
``pretrain.methods`` builds each method's combine transform from ``combine``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  tasks: tuple[str, ...]  # task names, in the order of the stacked gradients
  combine: str  # "ags" | "pcgrad" | "sum"
  neg_center_view: bool  # negative view 0 is the plain centre crop (SLAM methods)


_TWO_TASKS = ("ntxent", "similarity")


METHODS = {
    "slam_ags": Method(_TWO_TASKS, "ags", True),
    "weaksupcon": Method(_TWO_TASKS, "sum", True),
    "pcgrad": Method(_TWO_TASKS, "pcgrad", True),
    "simclr": Method(("ntxent_all",), "sum", False),
    "weakly": Method(("ce",), "sum", False),
    "random": Method((), "sum", False),
    # The same three with one projection head per task on the shared encoder (the model
    # reads the `_heads` suffix: models.task_heads). results/collapse: the shared head
    # collapses under the similarity loss's pull; a head of its own lets that task be met
    # without flattening the contrastive head.
    "slam_ags_heads": Method(_TWO_TASKS, "ags", True),
    "weaksupcon_heads": Method(_TWO_TASKS, "sum", True),
    "pcgrad_heads": Method(_TWO_TASKS, "pcgrad", True),
}
NAMES: tuple[str, ...] = tuple(METHODS)
TWO_TASK: tuple[str, ...] = tuple(name for name, m in METHODS.items() if len(m.tasks) == 2)

# pretrain.aggregator: "method" (the method's own `combine`) or a slamags_jax.surgery transform
# for the two task gradients, at its defaults (cagrad c=0.5, fairgrad alpha=1);
# pretrain.methods.AGGREGATORS builds each (a test checks the two agree).
AGGREGATORS: tuple[str, ...] = (
    "method", "ags", "pcgrad", "sum", "mean", "upgrad", "dualproj", "mgda", "cagrad", "imtl_g", "aligned_mtl",
    "con_fig", "nash_mtl", "gradvac", "graddrop", "fairgrad", "excess_mtl", "random_weights")
