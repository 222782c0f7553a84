"""The content store: content-addressed blobs, manifests and tag records on a storage driver.

Disk layout (the one place it is written down; `<root>` is `storage.root`):

    <root>/blobs/<algo>/<hex[:2]>/<hex>
        Verified content, addressed by digest: layers, configs and manifests alike (manifests
        byte-exact as upstream served them). One copy however many repositories use it.
        A file appears here only by an atomic rename after its digest and size matched.
    <root>/uploads/<algo>/<hex>
        The fill in progress for that digest. Followers read it as it grows; it is never
        served as complete. Left-overs with no live lease are removed at start-up.
        On S3 this is a prefix: the fill's pieces, `uploads/<algo>/<hex>/<offset>` (16 digits),
        each `storage.s3.part_size` bytes but the last (store/s3.py).
    <root>/repositories/<registry>/<repository>/_manifests/revisions/<algo>/<hex>
        This repository has this manifest; the file holds the media type upstream served.
    <root>/repositories/<registry>/<repository>/_manifests/tags/<tag>
        JSON `{"digest": "...", "mediaType": "...", "validated": <unix time>}`: the tag's
        manifest as of the last time upstream was asked.
    <root>/repositories/<registry>/<repository>/_layers/<algo>/<hex>
        Empty: this repository may be served this blob (a cached manifest of the repository
        references it, or upstream served it for this repository). Cached blobs are served
        only through such a link, so one repository's private content never leaks to another.
    <root>/tmp/
        Temporaries of atomic writes.

With `storage.driver: s3` every path above is an object key in the bucket, under
`storage.s3.prefix`; there are no directories.

`<registry>` is a configured registry name (`docker.io`), `<repository>` a validated name
(`library/alpine`): the grammar admits no `..`, so these are always paths under the root.
Everything in Redis can be rebuilt from this tree.
"""

from registry.store.content import ContentStore, TagRecord
from registry.store.driver import FilesystemDriver, PartialFile, StorageDriver

__all__ = ["ContentStore", "FilesystemDriver", "PartialFile", "StorageDriver", "TagRecord"]
