"""slamags-jax: SLAM-AGS (slide-label-aware multitask pretraining with adaptive
gradient surgery) for computational cytology, in JAX/Flax.

The package root stays light on purpose: ``from slamags_jax import surgery`` pulls in
jax and optax only, never the data or model stack. Import submodules explicitly.

Pipeline modules, in the order they run:
  data -> bags -> input_pipeline/augment -> models/pretrain -> embed -> mil -> report
Library building blocks with no package dependencies: ``surgery``, ``losses``.
"""

__version__ = "0.1.0"
