"""Emulation outside the server's process: worker processes that host machines behind the
driver interface (see pool.py for how many and where, wire.py for the protocol, host.py
for the worker side, remote.py and link.py for the server side)."""
