"""gunicorn settings for pullthrough: settings only, read from the environment."""

import multiprocessing
import os

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
control_socket_disable = True  # one path in $HOME shared by every instance: not wanted
