"""registry/offload.py under gevent, as gunicorn's workers run it: a file's writes handed to a
thread of their own (WriteBehind) leave the hub free, land in order, and a failed one is
raised by the next call and every one after it."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import errno
    import json

    import gevent
    from gevent.monkey import get_original

    from registry.offload import WriteBehind

    native_sleep = get_original("time", "sleep")
    native_ident = get_original("_thread", "get_ident")
    hub_thread = native_ident()
    done, threads, ticks = [], set(), []

    def write(i):
        native_sleep(0.1)  # a slow disk: the thread that writes is held
        threads.add("hub" if native_ident() == hub_thread else "other")
        done.append(i)

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    def tick():
        while True:
            ticks.append(1)
            gevent.sleep(0.01)

    ticker = gevent.spawn(tick)
    writes = WriteBehind(depth=2)
    for i in range(5):
        writes.submit(write, i)
    handed_over = list(done)
    writes.wait()
    out = {"handed_over": handed_over, "done": list(done), "threads": sorted(threads)}
    out["ticks"] = len(ticks)
    writes.submit(full)
    writes.submit(write, 9)
    try:
        writes.wait()
        out["raised"] = None
    except OSError as exc:
        out["raised"] = exc.errno
    # Raised again by whoever calls next: the descriptors of one file share a writer, and
    # one that lets go of it (waiting, the failure swallowed) must not hide it from the rest.
    again = []
    for call in (lambda: writes.submit(write, 10), writes.wait):
        try:
            call()
            again.append(None)
        except OSError as exc:
            again.append(exc.errno)
    out["again"] = again
    writes.close()
    ticker.kill()
    print(json.dumps(out))
    """
)


def test_writes_handed_to_their_thread_leave_the_hub_free_land_in_order_and_raise_later():
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    # Five writes of 0.1 s each, at most two waiting: the fifth was handed over once the
    # third was done, so the caller went on with two still to land.
    assert out["handed_over"] == [0, 1, 2]
    assert out["done"] == [0, 1, 2, 3, 4]
    assert out["threads"] == ["other"]
    # The hub ran its other greenlets meanwhile (a tick per 10 ms over about 0.5 s); in
    # place, the writes would have held it for all of that.
    assert out["ticks"] >= 20
    # A write that failed (the disk full) is raised by the caller's next wait, and by every
    # call after it until the writer is closed.
    assert out["raised"] == errno.ENOSPC
    assert out["again"] == [errno.ENOSPC, errno.ENOSPC]
