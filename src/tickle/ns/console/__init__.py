"""The web console: server-rendered pages (Jinja2) served by the NS itself under /console, with a
little of our own JavaScript; no build step, nothing fetched at run time.

`mount` adds its pages, its static files, `/` (a redirect to the console) and the API docs pages
(Swagger UI and ReDoc) served from the NS's own copy of their assets, so they work offline too.
"""

from __future__ import annotations

from fastapi import FastAPI

from tickle.ns.console import docs, pages, sessions


def mount(app: FastAPI, session_s: float) -> None:
    """Serve the console on `app`; a login lasts `session_s` seconds."""
    app.state.console_session_s = session_s
    app.state.console_login_throttle = sessions.LoginThrottle()
    app.include_router(pages.router)
    pages.mount_static(app)
    docs.mount(app)
    app.add_middleware(sessions.ConsoleHeaders)
