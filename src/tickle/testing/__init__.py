"""The test harness: local fleets of real processes (`localfleet`) and a throwaway CA (`devca`).

For the demo, the tests and the benchmarks; no component needs it, so neither does an agent-only
install. It sits above the components, like the CLI: it may import them, and no component and no
shared module imports it (the import contracts in pyproject.toml hold this).
"""
