"""PyTorch parity: the authors' algorithm written in PyTorch (``reference``), the step-by-step
comparison with ``slamags_jax.pretrain.train_step`` (``check``: float64 proof, float32 against
PyTorch's own spread measured by ``self_spread``) and the PyTorch step's benchmark
(``bench_reference``). They need torch (``pip install -e ".[torch-check]"``); the package
never imports them."""
