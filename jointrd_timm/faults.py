"""Test-only fault injection, so the fault campaign (tests/test_reliability.py) hits an exact point of a run.

``JOINTRD_FAULT=<point>:<n>[:<action>]`` makes the n-th arrival (1-based, in this process) at ``point`` fail:

* points: ``step`` (after a training step), ``checkpoint_write`` (the checkpoint's temporary file is written, not
  yet moved into place), ``metrics_write`` (half of a metrics line is written), ``final_save`` (``model/`` is
  written, ``final.json`` not yet), ``folder_probe`` (the writability check of the output folder);
* actions: ``kill`` (default: SIGKILL to itself, as a power cut or the OOM killer would), ``enospc`` (an
  ``OSError`` "No space left on device"), ``erofs`` (an ``OSError`` "Read-only file system").

Unset (every normal run), :func:`fault_point` is one dictionary lookup.
"""
import errno
import os
import signal

__all__ = ['fault_point', 'ENV']

ENV = 'JOINTRD_FAULT'
_arrivals = {}


def fault_point(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, count, *action = spec.split(':')
    if name != point:
        return
    _arrivals[point] = _arrivals.get(point, 0) + 1
    if _arrivals[point] != int(count):
        return
    action = action[0] if action else 'kill'
    if action == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    code = {'enospc': errno.ENOSPC, 'erofs': errno.EROFS}[action]
    raise OSError(code, f'{os.strerror(code)} (simulated by {ENV}={spec})')
