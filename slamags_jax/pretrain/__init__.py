"""Stage `pretrain`: multitask pretraining of the encoder (SLAM-AGS and its baselines).

Modules: ``methods`` (the one method registry and its gradient combination), ``optim``
(schedule and optimizer), ``step`` (the pure train step), ``monitor`` (the collapse
probe), ``stage`` (the loop, logging, checkpoints). One step serves every method of the benchmark; a method is a set of
tasks plus the rule that combines their gradients:

| method       | tasks (loss on which views)                         | combine |
|--------------|-----------------------------------------------------|---------|
| `slam_ags`   | NT-Xent on positive patches, similarity on negative | AGS     |
| `weaksupcon` | same two tasks                                      | sum     |
| `pcgrad`     | same two tasks                                      | PCGrad  |
| `simclr`     | NT-Xent on all patches (bag labels unused)          | T = 1   |
| `weakly`     | cross-entropy of patches with their bag label       | T = 1   |
| `random`     | none: the randomly initialised encoder              | -       |
| `*_heads`    | the first three with one projection head per task   | as base |

Per-task gradients: each task's loss is differentiated with `jax.grad` through its own
views only, so the tasks together cost one backward pass over the batch. The stacked
task gradients go through the `surgery` transform, then coupled weight decay and SGD
with momentum (PyTorch's SGD semantics).

Views and BatchNorm: the reference makes four forward passes per step (positive views 1
and 2, negative views 1 and 2) so that BatchNorm statistics are per view batch; here
each task makes one forward call over its two views and `models.BatchNorm` keeps the
statistics per view batch (same normalisation, larger convolutions). Running
statistics are updated in the reference's order (positive, then negative views).

Views on the device (`augment.on_device`): the input batch holds the decoded cells and
their (step, row), and `augmented_train_step` cuts the views (`device_augment`) inside the
same jitted program, sharded with the batch; the default takes the numpy views.

Where this project differs from the reference on purpose: batches come from proper
shuffled epochs (`input_pipeline`), not a window sliding by one image.
"""

from slamags_jax.pretrain.methods import (  # noqa: F401
    AGGREGATORS,
    METHODS,
    Method,
    combine_for_config,
    combine_transform,
    shared_label,
)
from slamags_jax.pretrain.monitor import (  # noqa: F401
    COLLAPSE_RANK,
    COLLAPSE_SPREAD,
    COLLAPSED_CHANCE_SHARE,
    COLLAPSED_HEAD_RANK,
    collapse_message,
    collapse_verdict,
    effective_rank,
    embedding_spread,
    ntxent_chance,
    probe_stats,
)
from slamags_jax.pretrain.optim import (  # noqa: F401
    lr_schedule,
    make_optimizer,
    similarity_temperature,
)
from slamags_jax.pretrain.step import (  # noqa: F401
    TrainState,
    augmented_train_step,
    create_train_state,
    init_variables,
    param_l2,
    task_gradients,
    task_loss,
    train_step,
)


def __getattr__(name: str):
  """``pretrain.run`` (the stage) is imported on first use: the step functions need no data stack."""
  if name == "run":
    from slamags_jax.pretrain.stage import run
    return run
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
