"""The Client Task Agent: listens for tickles, pulls tasks from its task server, runs them.

It imports only the shared pieces (wire format, messages, outbox, settings helpers), never the
server stack, so it installs on managed endpoints without FastAPI or SQLAlchemy.
"""
