"""Packets and peers: sans-IO state machines; only ``dataplane.io`` touches the operating system."""
