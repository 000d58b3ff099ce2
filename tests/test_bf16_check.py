"""tools/studies/bf16_check.py: its flags, the runs it would start, and the comparison (fake curves, no training)."""

import json
import os

import pytest

from tools.studies import bf16_check


def test_defaults_and_the_three_runs(tmp_path):
  args = bf16_check.parse_args(["--workdir-root", str(tmp_path)])
  assert (args.method, args.witness_rate, args.epochs, args.seed, args.noise_seed) == ("slam_ags_heads", 0.1, 2, 0, 1)
  assert args.out == str(tmp_path / "check.json")
  runs = bf16_check.runs_of(args)
  assert runs == {"float32": ("float32", 0), "bfloat16": ("bfloat16", 0), "float32_noise": ("float32", 1)}
  cmd = bf16_check.command_of(args, "bfloat16", 0)
  for flag in ("--config.model.dtype=bfloat16", "--config.seed=0", "--config.data.seed=0",
               "--config.stages=bags,pretrain", "--config.pretrain.epochs=2", "--config.bags.witness_rate=0.1"):
    assert flag in cmd
  assert "--config.data.seed=0" in bf16_check.command_of(args, "float32", 1)  # the same bags for the noise seed


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--noise-seed", "0"], ["--witness-rate", "0"],
                                  ["--config", "/nonexistent.py"], ["--data-root", "/nonexistent"]])
def test_bad_flags_are_one_error_line(argv, capsys):
  assert bf16_check.main(argv + ["--no-run"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")


def _records(losses, ranks):
  out = []
  for e, (values, rank) in enumerate(zip(losses, ranks)):
    for i, v in enumerate(values):
      out.append({"kind": "step", "step": 10 * e + i + 1, "epoch": e, "loss": v, "loss/ntxent": v / 2,
                  "loss/similarity": v / 2, "skipped": 0})
    out.append({"kind": "step", "step": 10 * e + 9, "epoch": e, "loss": 99.0, "skipped": 1})  # left out
    out.append({"kind": "epoch", "epoch": e, "effective_rank": rank, "head_effective_rank": rank,
                "pooled_effective_rank": rank + 1})
  return out


def test_curves_are_per_epoch_means_and_the_verdict_is_against_the_noise_reference():
  ref = bf16_check.curves(_records([[4.0, 2.0], [1.0, 1.0]], [10.0, 12.0]))
  assert ref["epoch"] == [0.0, 1.0] and ref["loss"] == [3.0, 1.0] and ref["loss/ntxent"] == [1.5, 0.5]
  assert ref["pooled_effective_rank"] == [11.0, 13.0]
  close = bf16_check.curves(_records([[4.1, 2.0], [1.0, 1.1]], [10.5, 12.0]))
  noise = bf16_check.curves(_records([[4.4, 2.0], [1.2, 1.0]], [9.0, 13.0]))
  far = bf16_check.curves(_records([[6.0, 4.0], [1.0, 1.0]], [3.0, 2.0]))
  ok = bf16_check.compare(ref, close, noise)
  assert set(ok) == set(bf16_check.LOSSES) | set(bf16_check.RANKS)
  assert all(v["within_noise"] for v in ok.values())
  assert ok["loss"]["max_abs_diff"] == pytest.approx(0.05) and ok["loss"]["max_noise"] == pytest.approx(0.2)
  bad = bf16_check.compare(ref, far, noise)
  assert not bad["loss"]["within_noise"] and not bad["effective_rank"]["within_noise"]
  text = bf16_check.table(bad, ref["epoch"])
  assert "OUTSIDE noise" in text and "| loss | 1 |" in text


def test_no_run_compares_finished_workdirs(tmp_path, capsys):
  args = bf16_check.parse_args(["--workdir-root", str(tmp_path)])
  for i, (name, (dtype, seed)) in enumerate(bf16_check.runs_of(args).items()):
    work = os.path.join(bf16_check.workdir_of(args, dtype, seed), "pretrain")
    os.makedirs(work)
    with open(os.path.join(work, "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in _records([[3.0 + 0.1 * i], [2.0]], [10.0 + i, 11.0]))
    with open(os.path.join(work, "summary.json"), "w") as f:
      json.dump({"wall_s": 10.0 + i}, f)
  assert bf16_check.main(["--workdir-root", str(tmp_path), "--no-run"]) == 0
  with open(tmp_path / "check.json") as f:
    report = json.load(f)
  assert report["runs"]["bfloat16"]["pretrain_wall_s"] == 11.0 and report["within_noise"] is True
  assert "within noise" in capsys.readouterr().out
