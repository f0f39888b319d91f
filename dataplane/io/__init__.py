"""Drivers: the only part of the data plane that touches sockets, threads, TUN devices and the clock."""
