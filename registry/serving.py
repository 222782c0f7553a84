"""A prompt graceful stop for gunicorn's gevent workers (installed by deploy/gunicorn.conf.py).

On SIGTERM gunicorn stops accepting and waits for its connections; a keep-alive connection
idle between requests (Docker daemons keep them for minutes) would hold the worker until
`keepalive` or `graceful_timeout` runs out. With this, the worker closes those idle
connections at once, while responses in flight (a long blob stream) finish, bounded by
`graceful_timeout`. Installed per worker after gevent has patched the process, by wrapping
the worker's own methods, so gunicorn's stock gevent worker class is kept.
"""

from __future__ import annotations

import contextlib
import signal
import socket


def end(sock) -> None:
    """Shut the connection down so that its handler's pending read sees a clean end of
    stream. gevent's own shutdown() would instead raise EBADF in the waiting greenlet (and
    gunicorn would log a traceback per connection), so go to the real socket beneath."""
    with contextlib.suppress(OSError):
        getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)


def prompt_graceful_stop(worker) -> None:
    import gevent

    idle: set[socket.socket] = set()
    handle, handle_request, handle_exit = worker.handle, worker.handle_request, worker.handle_exit

    def tracked_handle(listener, client, addr):
        idle.add(client)  # waiting for its first request
        try:
            return handle(listener, client, addr)
        finally:
            idle.discard(client)

    def tracked_request(listener_name, req, sock, addr):
        idle.discard(sock)
        try:
            return handle_request(listener_name, req, sock, addr)
        finally:
            if worker.alive:
                idle.add(sock)  # waiting for the next request on this connection
            else:
                # Stopping: this response is complete, so end the connection now rather
                # than wait for a next request that keep-alive would allow.
                end(sock)

    def close_idle() -> None:
        for sock in list(idle):
            end(sock)

    def on_term(sig, frame) -> None:
        handle_exit(sig, frame)
        gevent.spawn(close_idle)

    worker.handle = tracked_handle
    worker.handle_request = tracked_request
    signal.signal(signal.SIGTERM, on_term)
