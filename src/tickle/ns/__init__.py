"""The notification server: operator API, store, and the tickle server that wakes task servers."""
