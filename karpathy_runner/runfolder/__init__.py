"""The run folder, kdl's public contract: its layout (file names, run ids, creation), atomic file
operations (fsio), the locks and the run's heartbeat (locks, layout), reading runs (reader),
writing one (writer), and checkpoints.

Importing the package or its layout, fsio, locks and reader modules loads neither torch nor pydantic, so
that `kdl runs` and `kdl show` start fast.
"""
