"""MachineServer: the gRPC server (api -> core -> drivers and store)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("machineserver")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
