from __future__ import annotations

import pytest

from instances.ids import InstanceKey, InvalidName, check_label, parse_key


@pytest.mark.parametrize("good", ["a", "alice", "a1", "x-y", "0", "a" * 63, "9lives"])
def test_valid_labels(good: str) -> None:
    assert check_label(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "..",
        "a/b",
        "../etc",
        "Alice",
        "-a",
        "a-",
        "a" * 64,
        "a.b",
        "a b",
        "é",
        "a_b",
        "a\n",
        "a\x00",
    ],
)
def test_invalid_labels_are_refused_with_the_rule(bad: str) -> None:
    with pytest.raises(InvalidName, match="lowercase letters, digits"):
        check_label(bad)


def test_parse_key() -> None:
    assert parse_key("notes:alice") == InstanceKey("notes", "alice")
    assert str(parse_key("notes:alice")) == "notes:alice"


@pytest.mark.parametrize("bad", ["notes", "notes:", ":alice", "notes:../x", "Notes:a", "a:b:c"])
def test_bad_keys(bad: str) -> None:
    with pytest.raises(InvalidName):
        parse_key(bad)
