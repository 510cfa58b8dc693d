"""modelavg: parallel DNN training by periodic model averaging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modelavg")  # one source: pyproject.toml, through the installed metadata
except PackageNotFoundError:  # a source tree used without `pip install`
    __version__ = "0+unknown"
