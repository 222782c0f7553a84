"""The content store: content-addressed blobs, manifests and tag records on a storage driver.

The disk layout is written down once, with the one function per kind of path that builds
it: registry/store/paths.py.
"""

from registry.store.content import ContentStore, TagRecord
from registry.store.driver import StorageDriver
from registry.store.filesystem import FilesystemDriver
from registry.store.partial_files import PartialFile

__all__ = ["ContentStore", "FilesystemDriver", "PartialFile", "StorageDriver", "TagRecord"]
