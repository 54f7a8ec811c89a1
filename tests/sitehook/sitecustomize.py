"""Imported at start-up by a Python process whose PYTHONPATH names this folder: the tests set it
for the processes they cannot fork (torchrun's workers, a sweep's points), to install the kill
hook of tests/kill_at.py that KDL_TEST_SIGNAL asks for."""

import os
import sys

if os.environ.get("KDL_TEST_SIGNAL"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kill_at import install_from_environment

    install_from_environment()
