"""Chunking, dedup, compression, digests, range arithmetic and verified reads."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.image_format import (
    Bootstrap,
    ChunkInfo,
    Compressor,
    CorruptChunkError,
    Digester,
    DigestMismatch,
    InvalidOptionError,
    coalesce_chunks,
    decode_chunk,
    decode_run,
    read_file_range,
)

from .helpers import SMALL_CHUNK, Converted, convert, f, make_tar

CS = SMALL_CHUNK


def _text(n: int, seed: int = 0) -> bytes:
    """Compressible but non-repeating bytes."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"\n", b" "]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


def test_chunk_boundaries(tmp_path: Path) -> None:
    layer = make_tar([f("one", _text(CS, 1)), f("plus1", _text(CS + 1, 2)), f("minus1", _text(CS - 1, 3)), f("empty")])
    c = convert(tmp_path, [layer])
    sizes = {
        name: [r.chunk.uncompressed_size for r in c.boot.file_chunks(c.boot.lookup(name))]
        for name in ("/one", "/plus1", "/minus1", "/empty")
    }
    assert sizes == {"/one": [CS], "/plus1": [CS, 1], "/minus1": [CS - 1], "/empty": []}
    assert c.content("/plus1") == _text(CS + 1, 2)


def test_zero_filled_file_stores_one_chunk(tmp_path: Path) -> None:
    c = convert(tmp_path, [make_tar([f("zeros", bytes(10 * CS))])])
    refs = c.boot.file_chunks(c.boot.lookup("/zeros"))
    assert len(refs) == 10 and len({r.chunk.index for r in refs}) == 1
    assert c.result.stats.unique_chunks == 1 and c.result.stats.dedup_ratio == 10
    assert c.content("/zeros") == bytes(10 * CS)


def test_dedup_across_files_and_layers(tmp_path: Path) -> None:
    shared = _text(3 * CS, 7)
    lower = make_tar([f("a", shared), f("b", shared[:CS])])
    upper = make_tar([f("c", shared), f("d", shared + b"tail")])
    c = convert(tmp_path, [lower, upper])
    s = c.result.stats
    assert s.chunks == 3 + 1 + 3 + 4 and s.unique_chunks == 4
    assert [layer.new_chunks for layer in s.layers] == [3, 1]
    # Chunks of "c" point into the lower layer's blob: only "d"'s tail is new in blob 1.
    assert {r.chunk.blob_index for r in c.boot.file_chunks(c.boot.lookup("/c"))} == {0}
    assert c.boot.blobs[1].chunk_count == 1
    assert c.content("/d") == shared + b"tail"


def test_layer_with_only_known_content_gets_no_blob(tmp_path: Path) -> None:
    data = _text(2 * CS, 9)
    c = convert(tmp_path, [make_tar([f("a", data)]), make_tar([f("copy", data)])])
    assert len(c.result.blobs) == 1 and c.result.stats.layers[1].blob is None
    assert c.content("/copy") == data


@pytest.mark.parametrize("compressor", list(Compressor))
@pytest.mark.parametrize("digester", list(Digester))
def test_every_compressor_and_digester(tmp_path: Path, compressor: Compressor, digester: Digester) -> None:
    files = {"text": _text(5 * CS + 17, 1), "random": os.urandom(2 * CS + 5), "zeros": bytes(CS * 2)}
    c = convert(tmp_path, [make_tar([f(k, v) for k, v in files.items()])], compressor=compressor, digester=digester)
    assert c.boot.digester is digester
    assert all(b.compressor is compressor for b in c.boot.blobs)
    for name, data in files.items():
        assert c.content("/" + name) == data
    random_chunks = [r.chunk for r in c.boot.file_chunks(c.boot.lookup("/random"))]
    text_chunks = [r.chunk for r in c.boot.file_chunks(c.boot.lookup("/text"))]
    # Incompressible chunks are stored raw whatever the algorithm; text compresses unless "none".
    assert not any(ch.compressed for ch in random_chunks)
    assert all(ch.compressed for ch in text_chunks[:-1]) is (compressor is not Compressor.NONE)
    if compressor is Compressor.NONE:
        assert c.result.stats.compressed_bytes == c.result.stats.unique_bytes


def test_compressor_and_digester_names_parse(tmp_path: Path) -> None:
    c = convert(tmp_path, [make_tar([f("a", b"x" * 100)])], compressor="LZ4", digester="SHA256")
    assert c.boot.blobs[0].compressor is Compressor.LZ4 and c.boot.digester is Digester.SHA256
    with pytest.raises(InvalidOptionError):
        convert(tmp_path / "b", [make_tar([])], compressor="brotli")
    with pytest.raises(InvalidOptionError):
        convert(tmp_path / "c", [make_tar([])], digester="md5")


@pytest.mark.parametrize("size", [4 << 10, 64 << 10, 1 << 20, 16 << 20])
def test_valid_chunk_sizes(tmp_path: Path, size: int) -> None:
    data = _text(size + 100, 3)
    c = convert(tmp_path, [make_tar([f("x", data)])], chunk_size=size)
    assert c.boot.chunk_size == size
    assert [r.chunk.uncompressed_size for r in c.boot.file_chunks(c.boot.lookup("/x"))] == [size, 100]


@pytest.mark.parametrize("size", [0, 2048, 3000, 5000, 32 << 20, -4096])
def test_invalid_chunk_sizes(tmp_path: Path, size: int) -> None:
    with pytest.raises(InvalidOptionError):
        convert(tmp_path, [make_tar([])], chunk_size=size)


@pytest.fixture(scope="module")
def ranged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Converted, bytes]:
    data = _text(7 * CS + 123, 11)
    work = tmp_path_factory.mktemp("ranged")
    return convert(work, [make_tar([f("file", data)])]), data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 8 * CS + 500), size=st.integers(0, 9 * CS))
def test_chunks_for_range_covers_exactly_the_request(ranged: tuple[Converted, bytes], offset: int, size: int) -> None:
    c, data = ranged
    ino = c.boot.lookup("/file")
    refs = c.boot.chunks_for_range(ino, offset, size)
    end = min(offset + size, len(data))
    if offset >= end:
        assert refs == []
        return
    assert refs[0].file_offset <= offset < refs[0].file_end
    assert refs[-1].file_offset < end <= refs[-1].file_end
    assert [r.file_index for r in refs] == list(range(refs[0].file_index, refs[-1].file_index + 1))
    assert all(r.file_offset == r.file_index * CS for r in refs)
    assert read_file_range(c.boot, c.source, ino, offset, size) == data[offset:end]


def test_negative_ranges_are_rejected(ranged: tuple[Converted, bytes]) -> None:
    c, _ = ranged
    with pytest.raises(InvalidOptionError):
        c.boot.chunks_for_range(c.boot.lookup("/file"), -1, 10)


def _chunk(index: int, blob: int, offset: int, size: int) -> ChunkInfo:
    return ChunkInfo(index, blob, "00" * 32, offset, size, size, b"\0" * 32, False, Compressor.NONE, Digester.BLAKE3)


@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(1, 5)),
        min_size=0,
        max_size=30,
        unique_by=lambda t: t[:2],
    ),
    st.integers(0, 3),
    st.integers(1, 30),
)
def test_coalesce_properties(specs: list[tuple[int, int, int]], gap: int, max_run: int) -> None:
    chunks = [_chunk(i, b, o * 5, s) for i, (b, o, s) in enumerate(specs)]
    runs = coalesce_chunks(chunks + chunks[:3], max_gap=gap, max_run_bytes=max_run)
    flat = [c for r in runs for c in r.chunks]
    assert sorted(c.index for c in flat) == list(range(len(chunks)))  # each chunk once
    for r in runs:
        assert all(c.blob_index == r.blob_index for c in r.chunks)
        assert r.offset == r.chunks[0].compressed_offset and r.end == r.chunks[-1].compressed_end
        assert len(r.chunks) == 1 or r.length <= max_run
        for a, b in zip(r.chunks, r.chunks[1:], strict=False):
            assert 0 <= b.compressed_offset - a.compressed_end <= gap


def test_adjacent_chunks_form_one_run(tmp_path: Path) -> None:
    data = _text(6 * CS, 5)
    c = convert(tmp_path, [make_tar([f("x", data)])])
    refs = c.boot.file_chunks(c.boot.lookup("/x"))
    [run] = coalesce_chunks(r.chunk for r in refs)
    assert run.range_header == f"bytes=0-{run.length - 1}"
    blob = c.boot.blobs[run.blob_index]
    decoded = decode_run(run, c.source.read_range(blob, run.offset, run.length))
    assert b"".join(decoded[r.chunk.index] for r in refs) == data


def test_digest_mismatch_and_corruption_are_detected(tmp_path: Path) -> None:
    raw_data = os.urandom(CS)  # stored uncompressed: a flipped byte decompresses "fine"
    text = _text(CS, 2)
    c = convert(tmp_path, [make_tar([f("raw", raw_data), f("text", text)])])
    raw_chunk = c.boot.file_chunks(c.boot.lookup("/raw"))[0].chunk
    blob = c.boot.blobs[raw_chunk.blob_index]
    stored = bytearray(c.source.read_range(blob, raw_chunk.compressed_offset, raw_chunk.compressed_size))
    assert decode_chunk(raw_chunk, bytes(stored)) == raw_data
    stored[100] ^= 0xFF
    with pytest.raises(DigestMismatch) as err:
        decode_chunk(raw_chunk, bytes(stored))
    assert err.value.chunk_index == raw_chunk.index and "blake3:" in str(err.value)

    text_chunk = c.boot.file_chunks(c.boot.lookup("/text"))[0].chunk
    assert text_chunk.compressed
    packed = bytearray(c.source.read_range(blob, text_chunk.compressed_offset, text_chunk.compressed_size))
    packed[len(packed) // 2 :] = b"\xaa" * (len(packed) - len(packed) // 2)
    with pytest.raises(CorruptChunkError):
        decode_chunk(text_chunk, bytes(packed))
    with pytest.raises(CorruptChunkError):
        decode_chunk(text_chunk, b"short")


def test_tampered_blob_file_fails_the_read(tmp_path: Path) -> None:
    data = os.urandom(CS)
    c = convert(tmp_path, [make_tar([f("x", data)])])
    blob_path = c.result.blobs[0].path
    raw = bytearray(blob_path.read_bytes())
    raw[10] ^= 1
    blob_path.write_bytes(raw)
    with pytest.raises(DigestMismatch):
        c.content("/x")


def test_chunk_table_records_are_what_the_format_doc_says(tmp_path: Path) -> None:
    c = convert(tmp_path, [make_tar([f("x", _text(CS + 1, 4))])])
    data = c.result.bootstrap_path.read_bytes()
    boot = Bootstrap.load(data)
    first = boot.chunk(0)
    # Section 4 (chunks) entry: blob u32, flags u32, offset u64, csize u32, usize u32, digest 32s.
    off, _length = struct.unpack_from("<QQ", data, 64 + 4 * 16)
    assert struct.unpack_from("<IIQII32s", data, off) == (
        first.blob_index,
        1 if first.compressed else 0,
        first.compressed_offset,
        first.compressed_size,
        first.uncompressed_size,
        first.digest,
    )
