"""The small parsers of `damselfly convert`: sizes, prefetch lists, registry error bodies, progress."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import typer

from services.cli.convert import parse_size, read_prefetch_list
from shared.oci.convert import CountingRaw
from shared.oci.registry import _registry_errors


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("0x100000", 1 << 20), ("1MiB", 1 << 20), ("64K", 64 << 10), ("64kib", 64 << 10), ("2M", 2 << 20)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1G", "one", "-4096", "1.5M"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_size(text)


def test_prefetch_list(tmp_path: Path) -> None:
    listing = tmp_path / "prefetch.txt"
    listing.write_text("# comment\n/usr/bin/python3\n\n  /etc  \n")
    assert read_prefetch_list(str(listing)) == ["/usr/bin/python3", "/etc"]
    assert read_prefetch_list(None) == []
    with pytest.raises(typer.BadParameter):
        read_prefetch_list(str(tmp_path / "missing"))


def test_registry_error_bodies() -> None:
    body = '{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}'
    assert _registry_errors(body) == "MANIFEST_UNKNOWN: manifest unknown"
    assert _registry_errors("<html>bad gateway</html>") == "<html>bad gateway</html>"
    assert _registry_errors("") == ""


class _Count:
    def __init__(self) -> None:
        self.total = 0

    def advance(self, amount: int) -> None:
        self.total += amount

    def reset(self) -> None:
        self.total = 0

    def done(self) -> None:
        pass


def test_counting_reader_counts_what_is_read_and_seeks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 10)
    task = _Count()
    with io.BufferedReader(CountingRaw(path.open("rb"), task), buffer_size=1024) as reader:
        assert reader.read(10) == bytes(range(10))
        reader.seek(2550)
        assert reader.read() == bytes(range(246, 256))
    assert 0 < task.total <= 2560 + 1024
