"""OCI images in registries and layouts, and the convert / check / inspect pipelines of the lazy format.

Typical use (the CLI's ``damselfly convert``)::

    async with aiohttp.ClientSession() as session:
        source = open_store(parse_reference("127.0.0.1:5000/library/python:3.11"), session, insecure=True)
        target = open_store(parse_reference("oci:/tmp/out:python-lazy"), session)
        report = await convert_image(source, target, ConvertSettings(platform=Platform.parse("linux/amd64")))
"""

from .auth import Credentials, credentials_from_config, resolve_credentials
from .check import CheckReport, check_image
from .connect import open_store
from .convert import (
    DEFAULT_PLATFORM,
    FORMAT_VERSION,
    ConvertReport,
    ConvertSettings,
    convert_image,
    converted_config,
    damselfly_layers,
)
from .inspect import InspectReport, inspect_image
from .layout import LayoutStore
from .manifest import Descriptor, ImageIndex, ImageManifest, Platform, encode_manifest, parse_manifest
from .mediatypes import DAMSELFLY_BLOB, DAMSELFLY_BOOTSTRAP
from .progress import NullProgress, Progress, ProgressTask
from .reference import ImageRef, LayoutRef, RegistryRef, parse_reference
from .registry import RegistryClient, RegistryStore
from .store import ImageStore, ResolvedImage

__all__ = [
    "DAMSELFLY_BLOB",
    "DAMSELFLY_BOOTSTRAP",
    "DEFAULT_PLATFORM",
    "FORMAT_VERSION",
    "CheckReport",
    "ConvertReport",
    "ConvertSettings",
    "Credentials",
    "Descriptor",
    "ImageIndex",
    "ImageManifest",
    "ImageRef",
    "ImageStore",
    "InspectReport",
    "LayoutRef",
    "LayoutStore",
    "NullProgress",
    "Platform",
    "Progress",
    "ProgressTask",
    "RegistryClient",
    "RegistryRef",
    "RegistryStore",
    "ResolvedImage",
    "check_image",
    "convert_image",
    "converted_config",
    "credentials_from_config",
    "damselfly_layers",
    "encode_manifest",
    "inspect_image",
    "open_store",
    "parse_manifest",
    "parse_reference",
    "resolve_credentials",
]
