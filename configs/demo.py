r"""The demo: the whole pipeline on the in-repo sample of real blood cells, on a laptop CPU.

  python -m slamags_jax.main --config=configs/demo.py --workdir=/tmp/slamags_demo

Builds bags from the 300 cells in ``sample_data/pbc`` (lymphocytes and neutrophils are
normal, erythroblasts the witnesses; bags of 24 cells, k = 3 witnesses per positive
bag), pretrains a narrow ResNet18 with SLAM-AGS for a few epochs, embeds every cell,
trains attention MIL on the training bags (selected on the validation bags) and writes
the test report (bag F1/AUC, top-K witness retrieval, galleries) under the workdir.
Small bags and reuse of cells across bags (the sample is tiny) make it a smoke test of
the method on real images, not a benchmark result; see ``configs/`` for PBC-ERB.

Any key can be overridden, e.g. ``--config.stages=bags,pretrain`` or
``--config.data.root=../shared/data/pbc128``.
"""

from __future__ import annotations

import os

import ml_collections

from slamags_jax import config as config_lib

SAMPLE_ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sample_data", "pbc"))


def get_config() -> ml_collections.ConfigDict:
  cfg = config_lib.get_base_config()
  # Data and bags: the in-repo sample (100 cells per class; 60 % train pool).
  cfg.data.root = SAMPLE_ROOT
  cfg.data.normal_classes = "lymphocyte,neutrophil"
  cfg.data.abnormal_classes = "erythroblast"
  cfg.data.image_size = 54
  cfg.data.crop_size = 48
  cfg.data.workers = 0
  cfg.bags.bag_size = 24
  cfg.bags.witness_rate = 0.125  # k = 3 erythroblasts per positive bag
  cfg.bags.n_train = 16  # 8 + 8; val_fraction 0.2 -> 2 + 2 of them are validation bags
  cfg.bags.n_test = 16
  cfg.bags.allow_reuse = True  # 120 normal train cells for ~360 normal slots
  # Model and training: tiny, so the whole demo runs in minutes on 2 CPU cores.
  cfg.model.width = 8
  cfg.model.head_dim = 64
  cfg.pretrain.epochs = 3
  cfg.pretrain.warmup_epochs = 0
  cfg.pretrain.batch_size = 32
  cfg.pretrain.checkpoint_every_steps = 5
  cfg.pretrain.probe_cells = 64
  cfg.embed.batch_size = 64
  cfg.mil.epochs = 20
  cfg.mil.hidden_dim = 32
  cfg.mil.attention_dim = 16
  cfg.report.topk = 5
  cfg.report.gallery_bags = 4
  return cfg
