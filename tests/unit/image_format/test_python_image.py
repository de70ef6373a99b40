"""The real python-3.11 image from shared/images: conversion speed, load time, lookups, full check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.image_format import (
    Bootstrap,
    ConversionOptions,
    ConversionResult,
    ImageTree,
    LocalBlobSource,
    compare_trees,
    convert_layers,
    layout_layers,
    read_file_range,
    reference_tree,
)
from tests.support.images import python_image, read_layout_config, read_layout_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[ConversionResult, list[Path], Path]:
    layout = python_image().layout
    layers = [layer.path for layer in layout_layers(layout, "python")]
    work = tmp_path_factory.mktemp("python-image")
    result = convert_layers(layers, work, ConversionOptions(prefetch_files=["/usr/bin/python3"]))
    s = result.stats
    print(
        f"\nconverted {s.tar_bytes / 1e6:.1f} MB tar ({s.source_compressed_bytes / 1e6:.1f} MB gzip) "
        f"in {s.elapsed_seconds:.2f} s = {s.throughput_mb_s:.0f} MB/s; blobs {s.compressed_bytes / 1e6:.1f} MB, "
        f"bootstrap {s.bootstrap_size / 1e3:.0f} kB; {s.chunks} chunks, {s.unique_chunks} unique, "
        f"dedup {s.dedup_ratio:.3f}"
    )
    return result, layers, layout


def test_conversion_matches_the_image_config(converted: tuple[ConversionResult, list[Path], Path]) -> None:
    result, _, _ = converted
    manifest = read_layout_manifest(python_image())
    rootfs = read_layout_config(python_image())["rootfs"]
    assert isinstance(rootfs, dict)
    # The streaming reader's digests of what it read equal the image's own: nothing skipped or added.
    assert [layer.diff_id for layer in result.stats.layers] == rootfs["diff_ids"]
    assert [layer.compressed_digest for layer in result.stats.layers] == [d.digest for d in manifest.layers]
    assert result.stats.entries == 9092
    assert result.stats.prefetch_missing == []


def test_bootstrap_loads_fast_and_lookups_work(converted: tuple[ConversionResult, list[Path], Path]) -> None:
    result, _, _ = converted
    data = result.bootstrap_path.read_bytes()
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        boot = Bootstrap.load(result.bootstrap_path)
        timings.append(time.perf_counter() - start)
    print(f"\nbootstrap {len(data)} bytes loads in {min(timings) * 1000:.2f} ms (best of 5)")
    assert min(timings) < 0.1
    python = boot.lookup("/usr/bin/python3.11")
    assert python.is_reg and python.size > 1_000_000 and python.permissions == 0o755
    assert boot.lookup("/usr/bin/python3", follow_symlinks=True) == python
    assert boot.lookup("/bin/python3.11") == python  # /bin -> usr/bin
    assert boot.prefetch_files() == [python.ino]
    start = time.perf_counter()
    for _ in range(1000):
        boot.lookup("/usr/lib/python3.11/json/__init__.py")
    per_lookup = (time.perf_counter() - start) / 1000
    print(f"lookup of a 5-component path: {per_lookup * 1e6:.1f} us")
    with LocalBlobSource(result.bootstrap_path.parent / "blobs" / "sha256") as source:
        assert read_file_range(boot, source, python, 0, 4) == b"\x7fELF"


def test_full_check_against_the_reference(converted: tuple[ConversionResult, list[Path], Path]) -> None:
    result, layers, _ = converted
    boot = Bootstrap.load(result.bootstrap_path)
    boot.validate()
    with LocalBlobSource(result.bootstrap_path.parent / "blobs" / "sha256") as source:
        actual = ImageTree(boot, source).entries()
    assert compare_trees(reference_tree(layers), actual) == []
    assert sum(1 for e in actual.values() if e.content_sha256) >= 6000
