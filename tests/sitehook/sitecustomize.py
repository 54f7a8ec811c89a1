"""Imported at start-up by a Python process whose PYTHONPATH names this folder: the tests set it
for torchrun's workers, which they cannot start through tests/kill_at.py. With
KDL_TEST_SIGNAL=NAME:N:SIGNAL:TARGET in the environment, the process sends SIGNAL to TARGET
(`self`, or `parent`: the launcher of a torchrun worker) just before its N-th os.replace onto a
file named NAME, so a test stops a run at an exact point however busy the machine is."""

import os
import signal

_spec = os.environ.get("KDL_TEST_SIGNAL")
if _spec:
    _name, _nth, _signal, _target = _spec.split(":")
    _real_replace = os.replace
    _seen = [0]

    def _replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == _name:
            _seen[0] += 1
            if _seen[0] == int(_nth):
                os.kill(os.getppid() if _target == "parent" else os.getpid(), getattr(signal, _signal))
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
