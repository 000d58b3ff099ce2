"""Requirements and constraints for the GPU machine's Python (launch/gpu_wheels.sh, gpu_dryrun.sh).

  python -m tools.gpu_reqs OUTDIR [EXTRA_REQUIREMENT ...]

Writes into OUTDIR:
- requirements.txt: pyproject.toml's dependencies (and the extra requirements given);
- constraints.txt: the GPU machine's versions where launch/gpu_machine.txt gives one, and
  constraints.txt's tested versions for every package the GPU machine does not have;
- machine.txt: the normalised names of the packages the GPU machine has.
"""

from __future__ import annotations

import os
import re
import sys

import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def norm(name: str) -> str:
  """PEP 503 name: lower case, runs of -_. as one -."""
  return re.sub(r"[-_.]+", "-", name.strip().lower())


def req_name(req: str) -> str:
  return norm(re.split(r"[=<>!~;\s\[]", req, maxsplit=1)[0])


def read_reqs(path: str) -> list[str]:
  """Requirement lines of a file, comments and blank lines left out."""
  with open(path) as f:
    lines = [line.split("#")[0].strip() for line in f]
  return [line for line in lines if line]


def main(out: str, extra: list[str]) -> None:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  have = {req_name(r): r for r in read_reqs(os.path.join(REPO, "launch", "gpu_machine.txt"))}
  pins = [r for r in have.values() if "==" in r]
  tested = os.path.join(REPO, "constraints.txt")
  if os.path.exists(tested):
    pins += [r for r in read_reqs(tested) if req_name(r) not in have]
  os.makedirs(out, exist_ok=True)
  for name, lines in (("requirements.txt", deps + extra), ("constraints.txt", pins),
                      ("machine.txt", sorted(have))):
    with open(os.path.join(out, name), "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
