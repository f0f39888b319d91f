"""Seed material shared by the targets: byte strings from the known-answer vectors in tests/vectors."""

from __future__ import annotations

from typing import Any

from tests.vectors import load_vectors


def hex_fields(vector_file: str, field: str) -> list[bytes]:
    """Every value of ``field`` (a ``*_hex`` key) anywhere in ``vector_file``, decoded, in file order."""
    found: list[bytes] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == field and isinstance(value, str):
                    found.append(bytes.fromhex(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(load_vectors(vector_file))
    return found
