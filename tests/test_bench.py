"""The benchmark CLI: each mode prints one JSON line with its contract keys."""

import json
import os

import pytest

from slamags_jax import bench


def _run(capsys, *args):
  bench.main(list(args))
  lines = capsys.readouterr().out.strip().splitlines()
  return json.loads(lines[-1])


@pytest.mark.e2e  # the bench CLI end to end (in process): compiles and times a whole training step
def test_step_mode_prints_the_contract_keys_and_the_surgery_overhead(capsys):
  out = _run(capsys, "--pos", "2", "--neg", "2", "--size", "16", "--steps", "2", "--width", "4",
             "--conv-impl", "xla", "--surgery-overhead")
  for key in ("images_per_second", "step_ms", "loss", "param_l2", "devices", "gflops_per_second",
              "flops_per_step", "surgery_overhead", "sum_step_ms"):
    assert key in out, key
  assert out["devices"] == 1 and out["images_per_second"] > 0 and out["param_l2"] > 0
  assert out["images_per_second"] == pytest.approx(4 / (out["step_ms"] / 1e3), rel=1e-2)


@pytest.mark.e2e  # the bench CLI end to end (in process): compiles and times a whole training step
def test_step_mode_is_deterministic_for_a_seed(capsys):
  args = ("--pos", "2", "--neg", "2", "--size", "16", "--steps", "1", "--width", "4", "--conv-impl", "xla")
  a, b = _run(capsys, *args), _run(capsys, *args)
  assert a["loss"] == b["loss"] and a["param_l2"] == b["param_l2"]


@pytest.mark.e2e  # the bench CLI end to end (in process): three whole modes
def test_embed_mil_and_matmul_modes(capsys):
  emb = _run(capsys, "--mode", "embed", "--size", "16", "--batch", "8", "--steps", "1", "--width", "4",
             "--conv-impl", "xla")
  assert emb["images_per_second"] > 0 and emb["batch"] == 8
  mil = _run(capsys, "--mode", "mil", "--bags", "4", "--bag-size", "8", "--dim", "16", "--steps", "2")
  assert mil["train_bags_per_second"] > 0 and mil["infer_bags_per_second"] > 0
  mm = _run(capsys, "--mode", "matmul", "--matmul-n", "64", "--steps", "2")
  assert mm["n"] == 64 and mm["gflops_per_second"] > 0


def test_surgery_overhead_needs_two_tasks(capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--pos", "2", "--neg", "2", "--size", "16", "--steps", "1", "--width", "4",
                "--method", "simclr", "--surgery-overhead"])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_input_mode_times_the_pipeline_per_worker_count(capsys):
  out = _run(capsys, "--mode", "input", "--image-size", "20", "--crop", "16", "--batch", "4", "--cells", "8",
             "--steps", "2", "--workers", "0")
  assert out["mode"] == "input" and out["on_device"] is False and out["cpus"] >= 1
  (r,) = out["results"]
  assert r["workers"] == 0 and r["views_per_second"] > 0
  # batch_ms is rounded to 0.01 ms, which is more than 1 % of these tiny batches.
  assert 2 * 4 / r["views_per_second"] * 1e3 == pytest.approx(r["batch_ms"], rel=1e-2, abs=0.011)
  assert r["views_per_cpu_second"] is None or r["views_per_cpu_second"] > 0


def test_input_mode_on_device(capsys):
  out = _run(capsys, "--mode", "input", "--image-size", "20", "--crop", "16", "--batch", "4", "--cells", "8",
             "--steps", "2", "--workers", "0", "--on-device")
  assert out["on_device"] is True and out["device_views_per_second"] > 0
  assert out["results"][0]["views_per_second"] > 0


@pytest.mark.parametrize("args", [["--workers", "1,x"], ["--workers", "-1"], ["--cells", "2", "--batch", "4"],
                                  ["--crop", "80"]])
def test_input_mode_bad_flags_are_one_error(args, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--mode", "input", *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err


def test_cpu_delta_ignores_exited_processes_and_counts_new_ones():
  before = {1: 10.0, 2: 5.0, 3: 7.0}  # 3: an earlier iterator's worker, gone at the second reading
  after = {1: 12.5, 2: 6.0, 4: 1.5}  # 4: a worker started in between
  assert bench._cpu_delta(before, after) == 2.5 + 1.0 + 1.5
  assert bench._cpu_delta(None, after) is None
  now = bench._cpu_seconds()
  assert now is None or (os.getpid() in now and all(t >= 0 for t in now.values()))
