"""The S3 storage driver: the same layout as the filesystem, as object keys in one bucket.

Every path of store/paths.py is a key (under an optional prefix). What the filesystem does
with a file that grows and a rename, S3 does with pieces:

- A fill in progress is a row of **pieces**, `uploads/<algo>/<hex>/<offset>`: each one a plain
  object of `part_size` bytes (the last one shorter), PUT (its body's SHA-256 signed, which
  the store checks) as soon as the fill has that many bytes. Any process on any node follows
  a fill by reading the pieces that exist, so a client of another node gets bytes long
  before the fill completes, and a fill whose node died resumes from its last piece. Memory
  per fill is one piece (one per range of a parallel fill: a range ahead of the bytes in
  order writes its own pieces at its own offsets, which line up with the pieces' grid, and
  keeps a local spool of its bytes so that they are hashed in order without being read
  back; an `ExtentPieces`).
- The commit, once the digest matched, is one multipart upload of the blob's key whose parts
  are server-side copies of the pieces (UploadPartCopy): no byte crosses the network twice,
  and readers see the old key (nothing) or the whole blob. Then the pieces are deleted.
  S3 multipart parts cannot be read before the upload completes, which is why the pieces are
  objects of their own. The upload is begun as the fill goes (`PartCopies`): each piece is
  copied into its part once stored, so that after the last byte only the last piece is
  copied before the upload completes. A fill that ends otherwise aborts its upload; one
  whose process died leaves it to the GC (`abort_stale_multipart`), and whoever resumes the
  fill begins another.

Failures of the store reach the rest of the registry as `OSError(EIO, "<what> on S3 ...")`,
which it answers with a 503 naming the storage, as for a failing disk.
"""

from registry.store.s3.client import s3_client
from registry.store.s3.driver import S3Driver

__all__ = ["S3Driver", "s3_client"]
