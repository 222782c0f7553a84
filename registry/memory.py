"""The C allocator's thresholds in the processes that fill blobs (gunicorn's workers, the rq
worker that follows tags): the memory of a blob's freed chunks is used again, not handed
back to the kernel and asked for anew.

A fill reads its upstream body a MiB at a time (upstream/client.py BLOB_READ), each read a
new bytes object, held until its hash and its disk write are done (offload.py). glibc's
malloc serves a 1 MiB block from its heap once one was freed, but gives the heap's top back
to the kernel whenever more than twice that lies free there, so the next reads fault fresh
zeroed pages in, a page fault for every few KiB read (the figures: docs/benchmarks.md).
With the block size and the heap's slack fixed above what a fill holds at once, freed
chunks are used again. What it costs: up to TRIM_THRESHOLD of freed heap stays mapped per
malloc arena that held big blocks (the hub's thread; a pool thread taking a side extent
in): resident size after a fill, not a higher peak.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this come from the heap: above a body read's MiB (and its object header).
MMAP_THRESHOLD = 4 << 20
# Free memory at the heap's top up to this stays mapped: above what a fill holds at once
# (two write-behind queues of 16 reads each, offload.py).
TRIM_THRESHOLD = 64 << 20


def keep_chunk_memory() -> bool:
    """Set the thresholds (fixing them also ends glibc's own adjusting of them); whether the
    C library took them (only glibc does: elsewhere nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        taken = False
    else:
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        taken = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        taken = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and taken
    if not taken:
        log.info("the C library did not take malloc thresholds: fills fault fresh pages in")
    return taken
