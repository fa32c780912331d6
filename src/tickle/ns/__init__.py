"""The notification server: operator API, its services and stores, and the tickle server that wakes
task servers."""
