"""The known-answer vector files ship with the repo: every file is present, parses, and names its upstream sources."""

from __future__ import annotations

import pytest

from tests.vectors import VECTOR_DIR, VECTOR_FILES, load_vectors


def test_every_json_file_in_the_folder_is_listed() -> None:
    assert sorted(p.name for p in VECTOR_DIR.glob("*.json")) == sorted(VECTOR_FILES)


@pytest.mark.parametrize("name", VECTOR_FILES)
def test_vector_file_parses_and_names_its_sources(name: str) -> None:
    data = load_vectors(name)
    assert data["description"]
    assert data["source_commits"]
    assert name in (VECTOR_DIR / "README.md").read_text()


def test_a_missing_file_raises_instead_of_skipping() -> None:
    with pytest.raises(FileNotFoundError):
        load_vectors("no-such-vectors.json")
