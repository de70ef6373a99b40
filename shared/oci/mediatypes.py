"""Media types and annotation keys: the OCI/Docker ones we read, and Damselfly's own for converted images."""

from __future__ import annotations

from typing import Final

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_LIST})
#: What a pull asks for, most preferred first.
MANIFEST_ACCEPT: Final = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST])

#: Layer types the converter reads (the decoder sniffs the real compression from the bytes anyway).
SOURCE_LAYER_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)

# -- Damselfly's converted images (docs/convert.md) -------------------------------------------------

#: A data blob: compressed chunks back to back, no header; the bootstrap indexes it.
DAMSELFLY_BLOB: Final = "application/vnd.damselfly.image.blob.v1"
#: The bootstrap (docs/format.md): the merged tree, chunk table and prefetch table.
DAMSELFLY_BOOTSTRAP: Final = "application/vnd.damselfly.image.bootstrap.v1"
DAMSELFLY_LAYER_TYPES: Final = frozenset({DAMSELFLY_BLOB, DAMSELFLY_BOOTSTRAP})

_PREFIX = "io.damselfly.image."
ANNOTATION_FORMAT_VERSION: Final = _PREFIX + "format.version"
ANNOTATION_CHUNK_SIZE: Final = _PREFIX + "chunk-size"
ANNOTATION_COMPRESSOR: Final = _PREFIX + "compressor"
ANNOTATION_DIGESTER: Final = _PREFIX + "digester"
ANNOTATION_SOURCE_DIGEST: Final = _PREFIX + "source.digest"
ANNOTATION_SOURCE_LAYER: Final = _PREFIX + "source.layer"
ANNOTATION_BLOB_UNCOMPRESSED_SIZE: Final = _PREFIX + "blob.uncompressed-size"
ANNOTATION_BLOB_CHUNKS: Final = _PREFIX + "blob.chunks"
ANNOTATION_BOOTSTRAP: Final = _PREFIX + "bootstrap"

#: OCI image-layout annotation naming a manifest's tag in index.json.
ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"
