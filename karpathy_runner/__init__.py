"""kdl: a command-line experiment runner for classic deep learning."""

__version__ = "0.1.0"
