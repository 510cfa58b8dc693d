"""modelavg: parallel DNN training by periodic model averaging."""

__version__ = "0.1.0"
