"""Tickle: tickle task delivery for endpoint fleets."""

__version__ = "0.1.0"
