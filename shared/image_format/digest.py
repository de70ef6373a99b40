"""Chunk digests: blake3 (default, fastest here) or sha256, both 32 bytes."""

from __future__ import annotations

import enum
import hashlib

import blake3

from .errors import BootstrapError, InvalidOptionError

DIGEST_SIZE = 32


class Digester(enum.StrEnum):
    """Chunk digest algorithm; the string value is what options and docs use."""

    BLAKE3 = "blake3"
    SHA256 = "sha256"

    @property
    def code(self) -> int:
        """Stable on-disk code of this algorithm."""
        return 1 if self is Digester.BLAKE3 else 2

    @classmethod
    def from_code(cls, code: int) -> Digester:
        """Algorithm for an on-disk code."""
        if code == 1:
            return cls.BLAKE3
        if code == 2:
            return cls.SHA256
        raise BootstrapError(f"unknown digester code {code}")

    @classmethod
    def parse(cls, value: Digester | str) -> Digester:
        """Accept an enum member or its name, case-insensitively."""
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InvalidOptionError(f"unknown digester {value!r}; choose one of {choices}") from None

    def digest(self, data: bytes | memoryview) -> bytes:
        """32-byte digest of ``data``."""
        if self is Digester.BLAKE3:
            # Both hashers release the GIL on large inputs, which the converter's thread pool relies on.
            return blake3.blake3(data).digest()
        return hashlib.sha256(data).digest()

    def format_digest(self, digest: bytes) -> str:
        """Human-readable ``algo:hex`` form of a digest."""
        return f"{self.value}:{digest.hex()}"
