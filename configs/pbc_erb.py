r"""PBC-ERB, CPU tier: real blood cells, erythroblasts as rare witnesses (docs: benchmark.md).

One cell of the benchmark (method x witness rate x seed):

  python -m slamags_jax.main --config=configs/pbc_erb.py --workdir=workdirs/pbc_erb/one \
      --config.pretrain.method=slam_ags --config.bags.witness_rate=0.1 --config.seed=0

The whole sweep (resumable; appends one row per run to results/pbc_erb/runs.csv), then
the table and plots of results/pbc_erb/README.md:

  python launch/pbc_erb_sweep.py --methods slam_ags,weaksupcon,pcgrad,simclr,weakly,random \
      --witness-rates 0.1,0.05,0.02,0.01,0.005 --seeds 0,1,2
  python launch/pbc_erb_results.py

Expected result: each run ends with ``<workdir>/report/summary.json`` (bag F1/AUC, top-20
witness retrieval). The numbers are whatever the runs measure; they are reported in
results/pbc_erb/README.md as mean +- std over seeds.

Protocol (fixed; the same for every method): normal cells are the five leukocyte classes,
abnormal cells the erythroblasts, platelets unused; cell-level 60/40 train/test split per
class; bags of 200 cells, 60 train bags (30/30, 20 % of them the validation bags) and 60
test bags (30/30); k = max(1, round(200 x WR)) witnesses per positive bag; cells may repeat
across bags of one pool (the pools are too small for distinct cells at these counts),
never across pools. Cells are resized to 54 px and cropped to 48 px. Downstream: PAMIL,
Adam lr 1e-3, one bag per step, 100 epochs (the reference's), selected on the validation
bags; K = 20 (10 % of a bag) for top-K retrieval.

Tuned values (ResNet18 width, pretraining epochs, learning rate, batch, warm-up): chosen
once on the 10 % witness rate, for all methods alike (never per method), so that one
pretraining run takes at most about 2 minutes on 2 CPU cores. The values below marked
``CPU-tier choice`` are the current best guesses until the tuning runs replace them.

Tuning record (WR 10 %, every method, same settings for all):

  To be filled by the tuning runs: one line per setting tried (width, epochs, lr, batch,
  warm-up), with the pretraining wall time and mean bag F1 / recall@20 over methods, and
  the setting chosen. Until then the values below are unvalidated guesses. Each candidate
  is run and tabulated with (see results/pbc_erb/README.md):

    python launch/pbc_erb_sweep.py --witness-rates 0.1 --seeds 0 --csv results/pbc_erb/tuning.csv \
        --workdir-root workdirs/pbc_erb_tuning --set pretrain.epochs=2 --set pretrain.lr=0.01
    python launch/pbc_erb_results.py --csv results/pbc_erb/tuning.csv --tuning-table
"""

from __future__ import annotations

import os

import ml_collections

from slamags_jax import config as config_lib

# ``<repo>/../shared/data/pbc128``: the shared copy of the PBC images next to the checkout.
PBC128_ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "pbc128"))


def get_config() -> ml_collections.ConfigDict:
  cfg = config_lib.get_base_config()
  # Data (protocol).
  cfg.data.root = PBC128_ROOT
  cfg.data.normal_classes = "lymphocyte,neutrophil,monocyte,eosinophil,basophil"
  cfg.data.abnormal_classes = "erythroblast"
  cfg.data.image_size = 54
  cfg.data.crop_size = 48
  # Bags (protocol); the witness rate is set per run.
  cfg.bags.witness_rate = 0.1
  cfg.bags.bag_size = 200
  cfg.bags.n_train = 60
  cfg.bags.n_test = 60
  cfg.bags.train_fraction = 0.6
  cfg.bags.val_fraction = 0.2
  cfg.bags.allow_reuse = True
  # Encoder: ResNet18 topology, the authors' projection head; reduced width for CPU.
  cfg.model.depth = 18
  cfg.model.width = 16  # CPU-tier choice (torchvision: 64)
  cfg.model.head_dim = 512
  cfg.model.embedding = "head"
  # Pretraining: the method is set per run; everything else is the same for every method.
  cfg.pretrain.method = "slam_ags"
  cfg.pretrain.batch_size = 64  # CPU-tier choice (paper: 256)
  cfg.pretrain.lr = 0.01  # CPU-tier choice (paper: 1e-3 over 150 epochs)
  cfg.pretrain.epochs = 2  # CPU-tier choice: set by the tuning (<= ~2 min of pretraining)
  cfg.pretrain.warmup_epochs = 0  # CPU-tier choice (paper: 10 of 150)
  cfg.pretrain.momentum = 0.9
  cfg.pretrain.weight_decay = 1e-4
  cfg.pretrain.temperature = 0.07
  # Downstream (the reference's PAMIL training).
  cfg.mil.model = "pamil"
  cfg.mil.lr = 1e-3
  cfg.mil.bags_per_step = 1
  cfg.mil.epochs = 100
  # Report: K = 10 % of a 200-cell bag.
  cfg.report.topk = 20
  return cfg
