"""What kdl shows a person, given plain data: progress while training, tables and charts in the
terminal, learning-curve figures, image grids. Nothing here reads a run folder or imports torch
at import time."""
