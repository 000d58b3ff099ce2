"""Stage 2: attention-based multiple-instance learning (MIL) on frozen cell embeddings.

The aggregators (``mil.model``: ``abmil``, ``pamil``) are in ``slamags_jax.models.mil``
(re-exported here). Modules: ``batching`` (padding), ``steps`` (loss, optimizer, jitted
step and forward), ``inference`` (scoring), ``train`` (the loop and model selection),
``io`` (embedded bags, checkpoints, prediction files), ``stage`` (the ``mil`` stage).

Padding (the masking is in ``models.mil``: a bag alone and the same bag padded inside a
batch give the same logits, attention and gradients). Bags of one size are padded to one
bucketed length (next multiple of 32 of the largest bag), so every step and every
evaluation batch has the same shape (one compilation each). Bags of varying size (slides:
a hundred to 10,000+ cells) are padded per step and per evaluation batch to a power-of-two
tier of 32 (``tier_length``) at most that length: a few compiled shapes, and small bags do
not pay for the largest.

Training: Adam (AdamW when ``mil.weight_decay`` > 0), ``mil.bags_per_step`` bags per
step (1 = the reference; a short last step is padded with empty, zero-weight bags),
shuffled each epoch with an explicit key, bag cross-entropy (+ clustering losses).
Data parallelism (``mesh``; ``run`` uses every device of every process): the bag axis
of a step is split over the devices when the step has at least as many bags as there
are devices (padded with empty, zero-weight bags up to a multiple of the device count),
otherwise the step is replicated (one bag per step, the reference's setting: each device
would otherwise compute mostly empty bags). Parameters and Adam state are replicated;
the weighted mean over bags is a global reduction under ``jax.jit``, so a step equals
the single-device step. Evaluation batches are split over the devices likewise.

MODEL SELECTION (a documented departure from the authors, who select on training
accuracy): after every epoch the validation bags are scored; the selected epoch has the
highest validation ROC-AUC, ties (within 1e-9) broken by the lower validation
cross-entropy, and the earlier epoch wins a full tie. An undefined AUC (one class among
the validation bags) ranks below any defined one, so then the loss decides. Without
validation bags the stage stops with an error, unless ``mil.selection=last_epoch``
(``mil.selection=val_loss`` selects the lowest validation cross-entropy instead)
asks for the last epoch (then the log and summary say so).

Outputs of ``run`` under ``<workdir>/mil/``: ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (orbax; the selected ("best") and the last epoch, step = epoch,
written once training ends: the stage is short and reruns from scratch),
``predictions.npz`` + ``predictions.json`` (every bag: abnormal probability, class
probabilities ``probs``, prediction, per-cell ranking attention and every attention
branch; the class names in ``labels``) and, last, ``summary.json``.
The stage uses bag labels only; instance labels are read by the report stage.
"""

from slamags_jax.mil.batching import (  # noqa: F401
    PAD_MULTIPLE,
    Bag,
    Params,
    bucket_length,
    eval_batch_size,
    pad_batch,
    tier_length,
)
from slamags_jax.mil.inference import predict, split_metrics  # noqa: F401
from slamags_jax.mil.io import (  # noqa: F401
    SPLITS,
    embedded_labels,
    load_checkpoint,
    load_embedded_bags,
    load_predictions,
    prepare_inputs,
    save_checkpoints,
    standardization,
)
from slamags_jax.mil.stage import MIL_KEY_SALT, RESUME_FILE, run  # noqa: F401
from slamags_jax.mil.steps import (  # noqa: F401
    bag_loss,
    make_forward,
    make_optimizer,
    make_train_step,
    step_layout,
)
from slamags_jax.mil.train import FitResult, Interrupted, train_mil  # noqa: F401
from slamags_jax.models.mil import (  # noqa: F401  (mil.make_model etc. as before)
    ABNORMAL,
    NUM_CLASSES,
    GatedABMIL,
    PrototypeGatedMIL,
    WeightNormDense,
    init_model,
    l2_normalize,
    make_model,
    masked_softmax,
    model_from_meta,
)
