"""The DNS resource pattern match (docs/protocol.md §3.1) against a naive recursive model over labels."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.dns_pattern import matches


def _label_matches(pattern: str, label: str) -> bool:
    if not pattern:
        return not label
    head = pattern[0]
    if head == "*":
        return any(_label_matches(pattern[1:], label[i:]) for i in range(len(label) + 1))
    if not label:
        return False
    if head == "?" or head == label[0]:
        return _label_matches(pattern[1:], label[1:])
    return False


def _labels_match(patterns: list[str], labels: list[str]) -> bool:
    if not patterns:
        return not labels
    if patterns[0] == "**":
        return any(_labels_match(patterns[1:], labels[i:]) for i in range(len(labels) + 1))
    if "**" in patterns[0]:
        return False
    return bool(labels) and _label_matches(patterns[0], labels[0]) and _labels_match(patterns[1:], labels[1:])


def model(pattern: str, domain: str) -> bool:
    pattern, domain = pattern.lower().rstrip("."), domain.lower().rstrip(".")
    if "**" in pattern and any("**" in p and p != "**" for p in pattern.split(".")):
        return False
    if pattern.startswith("*.") and domain == pattern[2:]:
        return True
    return _labels_match(pattern.split("."), domain.split("."))


LABELS = st.sampled_from(["a", "b", "ab", "ba", "app", "x1", "A", "B"])
PATTERN_LABELS = st.sampled_from(["a", "b", "ab", "*", "**", "?", "a*", "*b", "?b", "a?", "A", "**x", "*a*"])


@settings(max_examples=2000)
@given(st.lists(PATTERN_LABELS, min_size=1, max_size=4), st.lists(LABELS, min_size=1, max_size=5))
def test_matches_like_the_naive_model(pattern_labels: list[str], labels: list[str]) -> None:
    pattern, domain = ".".join(pattern_labels), ".".join(labels)
    assert matches(pattern, domain) == model(pattern, domain), (pattern, domain)


@pytest.mark.parametrize(
    ("pattern", "domain", "expected"),
    [
        ("gitlab.mycorp.com", "gitlab.mycorp.com", True),
        ("gitlab.mycorp.com", "GitLab.MyCorp.com.", True),
        ("gitlab.mycorp.com", "x.gitlab.mycorp.com", False),
        ("*.corp.example", "a.corp.example", True),
        ("*.corp.example", "corp.example", True),
        ("*.corp.example", "a.b.corp.example", False),
        ("**.example.com", "example.com", True),
        ("**.example.com", "a.b.c.example.com", True),
        ("**.example.com", "badexample.com", False),
        ("?.httpbin", "a.httpbin", True),
        ("?.httpbin", "ab.httpbin", False),
        ("a**.example.com", "ab.example.com", False),
        ("app*.example.com", "app-1.example.com", True),
        ("*.example.com", "", False),
    ],
)
def test_documented_cases(pattern: str, domain: str, expected: bool) -> None:
    assert matches(pattern, domain) is expected
