"""Lazy image format ("Nydus half" of Damselfly): convert OCI layers to a bootstrap plus chunked blobs.

Typical use::

    result = convert_layers(layer_paths, work_dir, ConversionOptions(prefetch_files=["/usr/bin/python3"]))
    boot = Bootstrap.load(result.bootstrap_path)
    ino = boot.lookup("/usr/bin/python3", follow_symlinks=True)
    data = read_file_range(boot, LocalBlobSource(work_dir / "blobs/sha256"), ino, 0, 4096)
"""

from .bootstrap import (
    BlobInfo,
    Bootstrap,
    ChunkInfo,
    ChunkRef,
    DirEntry,
    FileType,
    Inode,
    write_bootstrap,
)
from .check import ImageTree, TreeDifference, TreeEntry, compare_trees, reference_tree
from .compression import Compressor
from .converter import (
    DEFAULT_CHUNK_SIZE,
    BlobFile,
    ConversionOptions,
    ConversionResult,
    ConversionStats,
    LayerStats,
    convert_layers,
)
from .digest import Digester
from .errors import (
    BootstrapError,
    CorruptChunkError,
    CorruptLayerError,
    DigestMismatch,
    DigestMismatchError,
    HardLinkError,
    HeaderTooLargeError,
    ImageFormatError,
    InvalidOptionError,
    LayerError,
    NoSuchXattrError,
    NotARegularFileError,
    NotASymlinkError,
    NotDirectoryError,
    NotFoundError,
    PathConflictError,
    SymlinkLoopError,
    TruncatedLayerError,
    UnsafePathError,
    UnsupportedCompressionError,
    UnsupportedEntryError,
    UnsupportedVersionError,
)
from .oci_layout import LayoutLayer, layout_layers
from .reader import (
    BlobSource,
    ChunkRun,
    LocalBlobSource,
    coalesce_chunks,
    decode_chunk,
    decode_run,
    fetch_chunks,
    read_file,
    read_file_range,
)
from .tar_merge import MergedTree
from .tar_reader import LayerCompression, LayerInput, LayerReader

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BlobFile",
    "BlobInfo",
    "BlobSource",
    "Bootstrap",
    "BootstrapError",
    "ChunkInfo",
    "ChunkRef",
    "ChunkRun",
    "Compressor",
    "ConversionOptions",
    "ConversionResult",
    "ConversionStats",
    "CorruptChunkError",
    "CorruptLayerError",
    "DigestMismatch",
    "DigestMismatchError",
    "Digester",
    "DirEntry",
    "FileType",
    "HardLinkError",
    "HeaderTooLargeError",
    "ImageFormatError",
    "ImageTree",
    "Inode",
    "InvalidOptionError",
    "LayerCompression",
    "LayerError",
    "LayerInput",
    "LayerReader",
    "LayerStats",
    "LayoutLayer",
    "LocalBlobSource",
    "MergedTree",
    "NoSuchXattrError",
    "NotARegularFileError",
    "NotASymlinkError",
    "NotDirectoryError",
    "NotFoundError",
    "PathConflictError",
    "SymlinkLoopError",
    "TreeDifference",
    "TreeEntry",
    "TruncatedLayerError",
    "UnsafePathError",
    "UnsupportedCompressionError",
    "UnsupportedEntryError",
    "UnsupportedVersionError",
    "coalesce_chunks",
    "compare_trees",
    "convert_layers",
    "decode_chunk",
    "decode_run",
    "fetch_chunks",
    "layout_layers",
    "read_file",
    "read_file_range",
    "reference_tree",
    "write_bootstrap",
]
