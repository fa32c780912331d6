"""`python -m tickle` is the `tickle` command.

`tickle agent run` (unless asking for help) starts the agent straight away, without the CLI: the
operator's commands (typer, rich, the console's client and every API model they name) would
stay in the agent's memory for as long as it runs (S7 of issue 10: 3.5 MB of its RSS at rest).
"""

from __future__ import annotations

import sys

_HELP = ("--help", "-h")


def main() -> None:
    flags = _agent_run_flags(sys.argv[1:])
    if flags is not None:
        from tickle.agent.start import main as agent_main

        raise SystemExit(agent_main(flags))
    from tickle.cli import main as cli_main

    cli_main()


def _agent_run_flags(args: list[str]) -> list[str] | None:
    """The agent's flags when `args` run the agent (`agent run FLAGS`, or `agent FLAGS` as the
    CLI reads it too); None for anything else, help included."""
    if args[:1] != ["agent"]:
        return None
    if args[1:2] == ["run"]:
        flags = args[2:]
    elif args[1:2] and not args[1].startswith("-"):
        return None  # another agent command (check-now, status, ...): the CLI's
    else:
        flags = args[1:]
    return None if any(flag in _HELP for flag in flags) else flags


if __name__ == "__main__":
    main()
