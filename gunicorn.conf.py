"""gunicorn reads ./gunicorn.conf.py when it is started without -c: pullthrough's settings
(deploy/gunicorn.conf.py) whichever way the web process is started from here."""

import os
import runpy

globals().update(
    runpy.run_path(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy", "gunicorn.conf.py")
    )
)
