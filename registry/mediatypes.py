"""Manifest media types (shared by the upstream client and manifest parsing)."""

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1)
DOCKER_SCHEMA1_UNSIGNED = "application/vnd.docker.distribution.manifest.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"  # OCI 1.1 rc, still seen
# What a manifest may be stored and served as: the cache sends a stored type back as
# Content-Type, so an upstream's text/html must never become one (script in our origin).
KNOWN_MANIFEST_TYPES = frozenset((*MANIFEST_TYPES, DOCKER_SCHEMA1_UNSIGNED, OCI_ARTIFACT))
