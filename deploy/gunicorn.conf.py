"""gunicorn settings for pullthrough: settings only, read from the environment."""

import multiprocessing
import os
import shutil
import sys
import tempfile

bind = os.environ.get("PULLTHROUGH_BIND", "0.0.0.0:5050")
# gevent workers: each serves many slow blob streams; a few processes use the cores.
worker_class = "gevent"
workers = int(os.environ.get("PULLTHROUGH_WORKERS") or min(multiprocessing.cpu_count() * 2, 8))
worker_connections = 1000
# The worker heartbeat, not a request limit: gevent workers keep beating while streaming.
timeout = 30
# On SIGTERM, in-flight blob streams get this long to finish.
graceful_timeout = int(os.environ.get("PULLTHROUGH_GRACEFUL_TIMEOUT", "60"))
keepalive = 75
accesslog = None
errorlog = "-"
loglevel = os.environ.get("PULLTHROUGH_LOG_LEVEL", "info")
# gunicorn's own lines in pullthrough's format (PULLTHROUGH_LOG_FORMAT: text or json).
logger_class = "registry.serving.GunicornLogger"
control_socket_disable = True  # one path in $HOME shared by every instance: not wanted

# Metrics from every worker are summed through files in this directory (prometheus_client's
# multiprocess mode). Set before the workers fork so they all see it.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(tempfile.gettempdir(), f"pullthrough-metrics-{bind.replace(':', '-')}"),
)


def on_starting(server):
    # A configuration that does not load stops the master here, with its problems one a line
    # (a container's log), rather than as a traceback in every worker that tries to boot.
    from registry.config import load_settings_or_report

    if load_settings_or_report() is None:
        sys.exit(2)
    # Counters of a previous run must not be added to this one's.
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def post_fork(server, worker):
    # Until the worker sets up its own signals (after gevent's patching) a SIGTERM reaches
    # the master's handler, copied into this process, which queues it in the master's
    # queue, copied too, that nobody here reads: the worker would serve on until
    # graceful_timeout and then be killed mid-transfer. Take it from there, and from now on
    # remember it.
    import queue
    import signal

    signal.signal(signal.SIGTERM, lambda _sig, _frame: setattr(worker, "alive", False))
    while True:
        try:
            if server.SIG_QUEUE.get_nowait() == signal.SIGTERM:
                worker.alive = False  # the master's own, or ours: the master is stopping
        except queue.Empty:
            break


def child_exit(server, worker):
    # A dead worker's live gauges stop counting; its counters stay in the sums.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    # pullthrough's own lines take their format and level from the app (registry/logs.py).
    # SIGTERM closes idle keep-alive connections at once; in-flight responses finish.
    from registry.serving import (
        cheap_date_header,
        greenlet_errors_logged,
        headers_with_body,
        prompt_graceful_stop,
        tls_and_plain,
        zero_copy_sendfile,
    )

    greenlet_errors_logged()
    prompt_graceful_stop(worker)
    # Outermost: a TLS connection is tracked as the wrapped socket its requests come on.
    tls_and_plain(worker)
    zero_copy_sendfile()
    cheap_date_header()
    headers_with_body()

    # A fill's freed chunks are used again, not faulted in anew from the kernel.
    from registry.memory import keep_chunk_memory

    keep_chunk_memory()
