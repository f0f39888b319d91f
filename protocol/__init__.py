"""The portal wire protocol: pure, sans-IO (no sockets, clocks, threads or randomness)."""
