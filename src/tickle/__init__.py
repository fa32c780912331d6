"""Tickle: tickle task delivery for endpoint fleets."""

__version__ = "0.2.0"
