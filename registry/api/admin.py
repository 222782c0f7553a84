"""What an operator ran from a shell, as HTTP for users with the admin role (auth.admins; the
Guard in registry/auth.py lets no one else reach these): POST /admin/refresh, /admin/evict,
/admin/pin and /admin/unpin with `image=<name>:<tag>` (evict also `repository=<name>`), as
a form (the repository page's buttons) or a query string (`curl -u admin -X POST ...`).
Each is logged with who did it. A browser's request must come from the cache's own pages
(its Sec-Fetch-Site or Origin says so), so another site cannot make a logged-in admin's
browser act (the pages carry no script: their buttons are plain forms)."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request, url_for
from redis.exceptions import RedisError

from registry import admin
from registry.errors import RegistryError
from registry.pullthrough.service import PullThrough

log = logging.getLogger("registry.admin")
bp = Blueprint("admin", __name__)

ACTIONS = ("refresh", "evict", "pin", "unpin")


def _pt() -> PullThrough:
    return current_app.extensions["pullthrough"]


def _from_our_pages() -> bool:
    """A browser says where a request comes from: Sec-Fetch-Site (every current browser),
    else Origin (the pages' no-referrer policy makes it `null`, refused then). A client
    that is no browser (curl) sends neither."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


def _answer(status: int, text: str, name: str | None) -> Response:
    if status < 400 and request.form and name:
        # A button on a repository page: back to that page.
        return Response(
            text + "\n",
            status=303,
            mimetype="text/plain",
            headers={"Location": url_for("ui.repository", name=name)},
        )
    return Response(text + "\n", status=status, mimetype="text/plain")


@bp.post("/admin/<action>")
def act(action: str) -> Response:
    if action not in ACTIONS:
        return Response(f"no action {action[:40]!r}: {', '.join(ACTIONS)}\n", status=404)
    if not _from_our_pages():
        return Response("refused: not from the cache's own pages\n", status=403)
    user = request.environ.get("REMOTE_USER", "-")
    image = request.values.get("image", "")
    repository = request.values.get("repository", "")
    pt = _pt()
    try:
        if action == "evict" and repository and not image:
            done = admin.evict_repository(pt, repository)
            what, said = repository, f"evicted {len(done)} tags of {repository}"
        elif not image:
            return _answer(400, "give image=<name>:<tag>", None)
        else:
            what = image
            if action == "refresh":
                said = f"refreshed {image}: {admin.refresh(pt, image)}"
            elif action == "evict":
                said = f"evicted {image} ({admin.evict(pt, image)})"
            else:
                admin.pin(pt, image, action == "pin")
                said = f"{action}ned {image}"
    except LookupError as exc:
        return _answer(404, str(exc).strip("'\""), None)
    except (ValueError, RegistryError) as exc:
        status = exc.status if isinstance(exc, RegistryError) else 400
        return _answer(status, str(exc), None)
    except (OSError, RedisError) as exc:
        return _answer(503, f"the store or Redis failed: {exc}", None)
    log.info("admin %s %s by %s from %s: %s", action, what, user, request.remote_addr, said)
    name = (repository or image.rpartition(":")[0]) if (repository or image) else None
    return _answer(200, said, name)
