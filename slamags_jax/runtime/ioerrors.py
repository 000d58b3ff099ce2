"""I/O failures (disk full, read-only folder, permission denied) as one line for the user.

They are not bugs, and a traceback hides the two facts that matter: which path and
which errno. ``describe(exc)`` finds them in the exception or its causes: a Python
``OSError`` (with ``filename``), or the status text of a tensorstore / orbax write
(``RESOURCE_EXHAUSTED: ... Failed writing: "<path>": ... [os_error_code='28']``, raised
as ValueError from checkpoint saves). ``main`` prints it as ``error: ...`` with exit
status 2. Outputs are written atomically (``fileio``, orbax's temporary folders), so
what was written before stays intact and a rerun after the cause is fixed continues.
"""

from __future__ import annotations

import errno
import os
import re

_CODE = re.compile(r"os_error_code='?(\d+)'?|\[OS error (\d+)")
_QUOTED = re.compile(r'"(/[^"]+)"')
_MAX_CHAIN = 8


def _errno_text(code: int) -> str:
  return f"{os.strerror(code)} ({errno.errorcode.get(code, '?')}, errno {code})"


def _from_oserror(e: OSError) -> tuple[int, str | None] | None:
  if not e.errno:
    return None
  paths = [os.fsdecode(p) for p in (e.filename, e.filename2) if p is not None]
  return e.errno, " -> ".join(paths) if paths else None


def _from_status_text(text: str) -> tuple[int, str | None] | None:
  m = _CODE.search(text)
  if not m:
    return None
  code = int(next(g for g in m.groups() if g))
  paths = _QUOTED.findall(text[:m.start()]) or _QUOTED.findall(text)
  return code, paths[-1] if paths else None


def mentions_os_error(text: str) -> bool:
  """True for library text about a failed file operation (tensorstore's status with an OS error code).

  ``main`` keeps such log records (orbax's background save thread logs its failure with
  a traceback before the exception reaches the caller) out of the log: the run ends with
  the one ``error:`` line that says the same.
  """
  return _CODE.search(text) is not None


def describe(exc: BaseException) -> str | None:
  """"<strerror> (<ENAME>, errno N): <path>" for an I/O failure in ``exc`` or its causes, else None.

  The first failure in the chain that names a path wins (a file's close after a failed
  write raises again, without the name).
  """
  found: list[tuple[int, str | None]] = []
  e: BaseException | None = exc
  for _ in range(_MAX_CHAIN):
    if e is None:
      break
    hit = _from_oserror(e) if isinstance(e, OSError) else None
    hit = hit or _from_status_text(str(e))
    if hit:
      found.append(hit)
    e = e.__cause__ or e.__context__
  if not found:
    return None
  code, path = next((h for h in found if h[1]), found[0])
  return f"{_errno_text(code)}: {path or '(path not reported)'}"
