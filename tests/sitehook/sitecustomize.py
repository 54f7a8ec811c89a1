"""Imported at start-up by a Python process whose PYTHONPATH names this folder: the tests set it
for torchrun's workers, which they cannot start through tests/kill_at.py. With
KDL_TEST_SIGNAL=NAME:N:SIGNAL:TARGET in the environment, the process sends SIGNAL to TARGET
(`self`; `parent`: the launcher of a torchrun worker; `parent-group`: the launcher's process group,
as a Ctrl-C at a terminal signals it) just before its N-th os.replace onto a
file named NAME, so a test stops a run at an exact point however busy the machine is.
KDL_TEST_SIGNAL=NAME:N:SIGNAL:TARGET:FILE signals only from the first process to get there."""

import os
import signal

_spec = os.environ.get("KDL_TEST_SIGNAL")
if _spec:
    # an optional fifth field names a file: the first process to signal creates it, and no
    # other process signals after it (of several trials of a sweep, one Ctrl-C)
    _name, _nth, _signal, _target, *_once = _spec.split(":")
    _real_replace = os.replace
    _seen = [0]

    def _first() -> bool:
        if not _once:
            return True
        try:
            os.close(os.open(_once[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def _replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == _name:
            _seen[0] += 1
            if _seen[0] == int(_nth) and _first():
                if _target == "parent-group":  # as a terminal's Ctrl-C: the launcher's whole group
                    os.killpg(os.getpgid(os.getppid()), getattr(signal, _signal))
                else:
                    os.kill(os.getppid() if _target == "parent" else os.getpid(),
                            getattr(signal, _signal))
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
