"""Data parallelism: 4 devices compute what 1 device computes on the same global batch.

The multi-device results come from ONE subprocess with 4 forced CPU host devices
(``XLA_FLAGS`` must be set before jax is imported): it runs each computation on a mesh
over ``jax.devices()[:1]`` and over all 4, and prints the comparisons as JSON (run this
file as a script to see them). Tiny model (ResNet18 topology, width 4, 32 px, 16 + 16
patches), three steps, so the four compilations of the step dominate (~1.5 min on 2
cores).

What is compared (rel. = relative error of the whole pytree, ||a - b|| / ||b||):
- pretraining (SLAM-AGS: NT-Xent, similarity loss, surgery, SGD; float64, see
  ``_pretrain_results``): per-step losses, parameters, the parameter updates and
  BatchNorm statistics, BN synchronised;
- ``model.bn_sync=False`` on 4 devices equals 1 device normalising each quarter of the
  batch separately (``device_groups=4``), and differs from the synchronised run;
- the compiled 4-device step: per-device batch shards, all-reduce / all-gather present;
- embeddings (``embed.embed_array``) and MIL training + prediction (sharded, padded and
  replicated step layouts).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
DEVICES = 4
SIZE, POS, NEG, STEPS = 32, 16, 16, 3
MEAN, STD = (0.6, 0.55, 0.74), (0.2, 0.24, 0.11)
RESULT = "RESULT "  # prefix of the child's JSON line (the collectives library prints too)


def _result(stdout: str) -> dict:
  """The child's JSON: text that C++ libraries (Gloo) write to the same stdout may follow it on its line."""
  line = next(line for line in stdout.splitlines() if line.startswith(RESULT))
  return json.JSONDecoder().raw_decode(line[len(RESULT):])[0]


# ----------------------------------------------------------------------------- child process


def _rel(a, b) -> float:
  """||a - b|| / ||b|| over all leaves of two pytrees (float64 on the host)."""
  import jax
  la = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(a)]
  lb = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(b)]
  num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(la, lb)))
  den = np.sqrt(sum(np.sum(y ** 2) for y in lb))
  return float(num / max(den, 1e-30))


def _collectives(hlo: str) -> dict:
  """Counts of collective instructions in compiled HLO text, and the uint8 (batch) parameter shapes."""
  counts = {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in ("all-reduce", "all-gather")}
  counts["u8_params"] = sorted(set(re.findall(r"param[.\d]*: (u8\[[\d,]*\])", hlo)))
  return counts


def _pretrain_results(mesh1, mesh4) -> tuple[dict, dict]:
  """Three SLAM-AGS steps on 1 and 4 devices (BN synced), and with per-device BN, in float64.

  Why float64: tiny random-image runs amplify float32 rounding from step to step (BatchNorm
  over a few values per channel at these sizes): in the bench's setting (width 64, 32 px)
  two 1-device runs on the same batch with its rows permuted drift apart by 1e-2 within
  four steps, while 1 and 4 devices agree to 1e-14 in float64. In float64 a real
  difference (a per-device mean, a missing reduction) stands out by many orders of
  magnitude; float32 is what ``python -m slamags_jax.bench`` compares.
  """
  import jax
  import jax.numpy as jnp

  from slamags_jax import config as config_lib
  from slamags_jax import models, pretrain
  from slamags_jax.runtime import parallel
  cfg = config_lib.get_base_config()
  cfg.model.width, cfg.model.head_dim, cfg.model.conv_impl = 4, 16, "xla"
  method = pretrain.METHODS["slam_ags"]
  rng = np.random.default_rng(0)
  batches = [{"pos": rng.integers(0, 256, (POS, 2, SIZE, SIZE, 3), dtype=np.uint8),
              "neg": rng.integers(0, 256, (NEG, 2, SIZE, SIZE, 3), dtype=np.uint8)} for _ in range(STEPS)]

  def build(mesh, groups):
    model = models.from_config(cfg, device_groups=groups).clone(dtype=jnp.float64)
    tx = pretrain.make_optimizer(cfg, method, steps_per_epoch=STEPS)
    state0 = pretrain.create_train_state(model, tx, jax.random.key(0), SIZE)
    to64 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
    params = to64(state0.params)
    state0 = state0.replace(params=params, batch_stats=to64(state0.batch_stats), opt_state=tx.init(params))
    step = jax.jit(functools.partial(pretrain.train_step, model=model, tx=tx, method=method, mean=MEAN, std=STD,
                                     temperature=0.07),
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
    state = parallel.replicate(state0, mesh)
    return mesh, state0, state, step.lower(state, parallel.global_batch(batches[0], mesh))

  def run(mesh, state0, state, lowered):
    compiled = lowered.compile()
    losses = []
    for b in batches:
      state, m = compiled(state, parallel.global_batch(b, mesh))
      losses.append(float(m["loss"]))
    host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return {"losses": losses, "init": jax.device_get(state0.params), "hlo": _collectives(compiled.as_text()),
            **host}

  def compare(a, b):
    upd = lambda r: jax.tree_util.tree_map(lambda p, p0: np.asarray(p, np.float64) - p0, r["params"], r["init"])  # noqa: E731
    return {"losses": [a["losses"], b["losses"]],
            "loss_rel": max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"])),
            "param_rel": _rel(a["params"], b["params"]), "update_rel": _rel(upd(a), upd(b)),
            "stats_rel": _rel(a["batch_stats"], b["batch_stats"])}

  jax.config.update("jax_enable_x64", True)
  try:
    # Compiling dominates; two at a time use both cores of a small machine.
    built = [build(mesh, groups) for groups in (1, DEVICES) for mesh in (mesh1, mesh4)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      one, four, quarters, per_device = pool.map(lambda b: run(*b), built)
  finally:
    jax.config.update("jax_enable_x64", False)
  synced = {**compare(four, one), "hlo": four["hlo"]}
  unsynced = {**compare(per_device, quarters), "hlo": per_device["hlo"],
              "vs_synced_loss_rel": abs(per_device["losses"][0] - four["losses"][0]) / abs(four["losses"][0]),
              "vs_synced_stats_rel": _rel(per_device["batch_stats"], four["batch_stats"])}
  variables = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                                     {"params": one["params"], "batch_stats": one["batch_stats"]})
  return {"synced": synced, "unsynced": unsynced}, {"cfg": cfg, "variables": variables}


def _embed_results(mesh1, mesh4, cfg, variables) -> dict:
  """Per-cell embeddings of 10 images (one full and one padded batch of 8) on 1 and 4 devices."""
  from slamags_jax import embed, models
  from slamags_jax.runtime import parallel
  images = np.random.default_rng(1).integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8)
  model = models.from_config(cfg)
  out = {}
  for name, mesh in (("one", mesh1), ("four", mesh4)):
    fn = embed.make_embed_fn(model, cfg, mesh)
    out[name] = embed.embed_array(fn, parallel.replicate(variables, mesh), images, mesh, batch_size=8)
  return {"shape": list(out["four"].shape), "rel": _rel(out["four"], out["one"]),
          "max_abs": float(np.max(np.abs(out["four"] - out["one"])))}


def _mil_bags(rng, n, prefix, split, dim=8):
  bags = []
  for i in range(n):
    k = int(rng.integers(4, 30))
    e = rng.normal(size=(k, dim)).astype(np.float32)
    if i % 2:
      e[: max(1, k // 6)] += 2.0  # witnesses
    bags.append({"id": f"{prefix}{i}", "split": split, "label": i % 2, "embeddings": e,
                 "cell_ids": np.arange(k, dtype=np.int64)})
  return bags


def _without_inert_bias(params: dict) -> dict:
  """PAMIL parameters less ``attention_class.bias``.

  That bias shifts a class's attention logit of every instance alike before the softmax
  over instances, so it changes no output and its exact gradient is zero; Adam walks it
  on rounding noise (differently on 1 and 4 devices, and to no effect).
  """
  out = dict(params)
  out["attention_class"] = {k: v for k, v in params["attention_class"].items() if k != "bias"}
  return out


def _mil_results(mesh1, mesh4, layouts=((4, 0.0), (6, 0.2), (1, 0.0))) -> dict:
  """PAMIL fits (3 epochs) and test predictions on 1 vs 4 devices, for (bags per step, dropout) layouts.

  4 bags: sharded 1 per device; 6 bags: padded to 8, sharded (with dropout); 1 bag: replicated.
  """
  import jax

  from slamags_jax import config as config_lib
  from slamags_jax import mil
  rng = np.random.default_rng(2)
  train, val, test = _mil_bags(rng, 14, "t", "train"), _mil_bags(rng, 4, "v", "val"), _mil_bags(rng, 6, "s", "test")
  out = {}
  for bpe, dropout in layouts:
    c = config_lib.get_base_config().mil
    c.model, c.hidden_dim, c.attention_dim, c.n_prototypes = "pamil", 16, 8, 4
    c.lr, c.epochs, c.bags_per_step, c.dropout = 1e-2, 3, bpe, dropout
    res = {}
    for name, mesh in (("one", mesh1), ("four", mesh4)):
      fit = mil.train_mil(train, val, c, jax.random.PRNGKey(0), progress=False, mesh=mesh)
      pred = mil.predict(mil.make_model(c), fit.params, test, fit.length, mesh=mesh)
      res[name] = {"params": _without_inert_bias(jax.device_get(fit.params)),
                   "loss": [r["train_loss"] for r in fit.history],
                   "val_loss": [r["val_loss"] for r in fit.history], "prob": pred["prob"],
                   "attention": np.concatenate(pred["attention"])}
    a, b = res["four"], res["one"]
    out[f"bags_per_step={bpe}"] = {
        "layout": list(mil.step_layout(bpe, DEVICES)), "param_rel": _rel(a["params"], b["params"]),
        "loss_rel": _rel(a["loss"], b["loss"]), "val_loss_rel": _rel(a["val_loss"], b["val_loss"]),
        "prob_rel": _rel(a["prob"], b["prob"]), "attention_rel": _rel(a["attention"], b["attention"])}
  return out


def multiprocess_child(process_id: int, port: int) -> dict:
  """One of 2 processes x 2 CPU devices (``jax.distributed`` over localhost, gloo collectives).

  Compares the 4-device global mesh (both processes) with a 1-device mesh of this
  process's first device: per-process rows -> global batch order, MIL fit + prediction
  (whole host arrays placed with ``host_to_global``, results gathered with ``to_host``,
  as embedding does), and a file written by process 0 read by process 1 after ``sync``.
  """
  os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(process_id))
  import jax

  from slamags_jax.runtime import fileio, parallel
  parallel.initialize()
  assert jax.process_count() == 2 and jax.device_count() == DEVICES, (jax.process_count(), jax.device_count())
  mesh4, mesh1 = parallel.data_mesh(), parallel.data_mesh(jax.local_devices()[:1])
  out = {"process": jax.process_index(), "writer": parallel.is_writer()}
  # Each process feeds its own rows; the global batch is their concatenation in process order.
  local = np.arange(4, dtype=np.float32)[:, None] + 10 * jax.process_index()
  out["rows"] = parallel.to_host(parallel.global_batch(local, mesh4))[:, 0].tolist()
  out["mil"] = _mil_results(mesh1, mesh4, layouts=((4, 0.0),))
  # Process 0 writes, the barrier, then process 1 reads.
  path = os.path.join(os.environ["SLAMAGS_TEST_DIR"], "written.json")
  if parallel.is_writer():
    fileio.write_json(path, {"by": jax.process_index()})
  parallel.sync("test: written")
  out["read"] = fileio.read_json(path)
  return out


def child() -> dict:
  import jax

  from slamags_jax.runtime import parallel
  devices = jax.devices()
  assert len(devices) == DEVICES, f"expected {DEVICES} forced host devices, got {len(devices)}"
  mesh1, mesh4 = parallel.data_mesh(devices[:1]), parallel.data_mesh(devices)
  pre, trained = _pretrain_results(mesh1, mesh4)
  return {"devices": len(devices), "pretrain": pre,
          "embed": _embed_results(mesh1, mesh4, trained["cfg"], trained["variables"]),
          "mil": _mil_results(mesh1, mesh4)}


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def results() -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={DEVICES}"])
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, HERE], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return _result(proc.stdout)


# Float64 (see _pretrain_results): measured ~1e-14 (synced) and ~1e-12 (per-device BN);
# the bounds leave room for other BLAS / XLA versions and are far below the 1e-4 asked.
TIGHT = 1e-8


@pytest.mark.e2e
def test_pretraining_steps_on_4_devices_equal_1_device(results):
  r = results["pretrain"]["synced"]
  assert results["devices"] == DEVICES
  assert r["loss_rel"] < TIGHT, r["losses"]
  assert r["param_rel"] < TIGHT and r["stats_rel"] < TIGHT, r
  # The updates themselves (params - init), not only the parameters they are added to.
  assert r["update_rel"] < TIGHT, r


@pytest.mark.e2e
def test_bn_per_device_equals_per_quarter_on_1_device_and_differs_from_synced(results):
  r = results["pretrain"]["unsynced"]
  assert r["loss_rel"] < TIGHT and r["param_rel"] < TIGHT and r["stats_rel"] < TIGHT, r
  assert r["update_rel"] < TIGHT, r
  # A control that the comparison can fail: per-device statistics change the result.
  assert r["vs_synced_loss_rel"] > 1e-3 and r["vs_synced_stats_rel"] > 1e-3, r


@pytest.mark.e2e
def test_compiled_step_keeps_the_batch_sharded_and_reduces_globally(results):
  synced = results["pretrain"]["synced"]["hlo"]
  unsynced = results["pretrain"]["unsynced"]["hlo"]
  shard = f"u8[{POS // DEVICES},2,{SIZE},{SIZE},3]"
  assert synced["u8_params"] == [shard], synced  # each device gets its rows, never the whole batch
  assert synced["all-gather"] >= 1  # NT-Xent's embeddings of the whole global batch
  # BN statistics are all-reduced per layer when synced; per-device BN leaves the gradient and loss reductions.
  assert synced["all-reduce"] > 40 > unsynced["all-reduce"] >= 1, (synced, unsynced)


@pytest.mark.e2e
def test_embeddings_on_4_devices_equal_1_device(results):
  r = results["embed"]
  assert r["shape"] == [10, 16]
  assert r["rel"] < 1e-6, r  # eval mode: rows are independent (measured: identical)


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["bags_per_step=4", "bags_per_step=6", "bags_per_step=1"])
def test_mil_on_4_devices_equals_1_device(results, layout):
  r = results["mil"][layout]
  for key in ("param_rel", "loss_rel", "val_loss_rel", "prob_rel", "attention_rel"):
    assert r[key] < 1e-4, (key, r)


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_of_two_devices_agree_with_one_device(tmp_path):
  """Multi-host on one machine: 2 processes x 2 CPU devices, one program over the 4."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env.update(XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]), JAX_PLATFORMS="cpu",
             SLAMAGS_TEST_DIR=str(tmp_path))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, HERE, str(i), str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-4000:]
    outs.append(_result(stdout))
  for i, r in enumerate(outs):
    assert r["process"] == i and r["writer"] == (i == 0)
    assert r["rows"] == [0, 1, 2, 3, 10, 11, 12, 13]  # process 0's rows, then process 1's
    assert r["read"] == {"by": 0}  # written by process 0 alone, visible to both after sync
    for key in ("param_rel", "loss_rel", "val_loss_rel", "prob_rel", "attention_rel"):
      assert r["mil"]["bags_per_step=4"][key] < 1e-4, (key, r["mil"])
  assert outs[0]["mil"] == outs[1]["mil"]  # every process holds the same results


def test_mil_step_layout():
  from slamags_jax import mil
  assert mil.step_layout(1, 1) == (1, False)
  assert mil.step_layout(1, 4) == (1, False)  # one bag per step: replicated
  assert mil.step_layout(3, 4) == (3, False)
  assert mil.step_layout(4, 4) == (4, True)
  assert mil.step_layout(6, 4) == (8, True)  # padded with empty bags to a multiple of the devices


def test_initialize_only_starts_the_runtime_for_multi_process_launches(monkeypatch):
  import jax

  from slamags_jax.runtime import parallel
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(a))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for var in ("SLAMAGS_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(parallel, "_on_cloud_tpu_vm", lambda: False)
  parallel.initialize()
  assert calls == []  # a plain single-process run
  monkeypatch.setenv("SLURM_NTASKS", "2")
  parallel.initialize()
  assert calls == [()]  # auto-detected by JAX
  monkeypatch.setenv("SLAMAGS_DISTRIBUTED", "0")
  parallel.initialize()
  assert calls == [()]  # explicitly off
  monkeypatch.delenv("SLAMAGS_DISTRIBUTED")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  parallel.initialize()
  assert calls[-1] == ("10.0.0.1:1234", 2, 1)  # a manual launch, with exactly its values


if __name__ == "__main__":
  if len(sys.argv) == 3:  # process id, coordinator port
    print(RESULT + json.dumps(multiprocess_child(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
  else:
    print(RESULT + json.dumps(child()), flush=True)
