"""The agent's settings (`TICKLE_AGENT_*`): one typed object read once at start.

A msgspec Struct read by `tickle.settingsbase.load_settings` (flags, environment, TOML file, with
the servers' rules and messages): the agent loads no pydantic (S7 of issue 10).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar

from msgspec import Meta, field

from tickle import tls, wire
from tickle.agentapi import OUTPUT_MAX_BYTES, OUTPUT_TAIL_MAX, Name, TaskRequestIntervalS
from tickle.settingsbase import (
    FRESHNESS_DESCRIPTION,
    FRESHNESS_MAX_S,
    LeanSettings,
    check_http_url,
    default_state_dir,
    hostname,
)

DEFAULT_TASK_SERVER = "http://127.0.0.1:50121"
PORT = Meta(ge=1, le=65535)


def _state_dir() -> Path:
    return default_state_dir("agent")


class AgentSettings(LeanSettings, kw_only=True):
    """Settings of the Client Task Agent (flags, `TICKLE_AGENT_*` environment, TOML file)."""

    model_config: ClassVar[dict[str, str]] = {"env_prefix": "TICKLE_AGENT_"}

    name: Annotated[Name, Meta(description="This computer's name")] = field(
        default_factory=hostname
    )
    task_servers: Annotated[
        list[str],
        Meta(
            min_length=1,
            description="Task server URLs, first reachable wins (JSON list or comma-separated)",
        ),
    ] = field(default_factory=lambda: [DEFAULT_TASK_SERVER])
    enrollment_secret: Annotated[
        str,
        Meta(
            description="Agents' enrollment secret, which lets the agent register with a task "
            "server"
        ),
    ] = ""
    groups: Annotated[
        list[Name], Meta(description="Groups reported at registration (JSON or comma list)")
    ] = field(default_factory=list)
    cem: Annotated[bool, Meta(description="Cloud-enabled mode: no tickle listener, poll")] = False
    gateway_url: Annotated[
        str | None, Meta(description="CEM: send every task-server call to this URL instead")
    ] = None
    tickle_host: Annotated[str, Meta(description="Address the tickle listener binds")] = "0.0.0.0"
    tickle_port: Annotated[int, PORT, Meta(description="Tickle UDP port")] = 50124
    advertise_host: Annotated[
        str | None,
        Meta(description="Address the task server tickles (default: routing-table source address)"),
    ] = None
    advertise_port: (
        Annotated[
            int,
            PORT,
            Meta(
                description="Port the task server tickles (default: tickle_port; for port "
                "forwarding)"
            ),
        ]
        | None
    ) = None
    state_dir: Annotated[Path, Meta(description="Agent state directory")] = field(
        default_factory=_state_dir
    )
    control_socket: Annotated[
        Path | None,
        Meta(description="Unix socket of the control API (default {state_dir}/agent.sock)"),
    ] = None
    metrics_host: Annotated[str, Meta(description="Metrics HTTP address")] = "127.0.0.1"
    metrics_port: Annotated[
        int, Meta(ge=0, le=65535, description="Metrics HTTP port (0: control socket only)")
    ] = 0
    output_tail_bytes: Annotated[
        int,
        Meta(
            ge=0,
            le=OUTPUT_TAIL_MAX,
            description="Bytes of a step's last output (stdout and stderr as they came) shown in "
            "the run's summary",
        ),
    ] = OUTPUT_TAIL_MAX
    output_max_bytes: Annotated[
        int,
        Meta(
            ge=1024,
            le=OUTPUT_MAX_BYTES,
            description="Bytes of output (stdout and stderr together) kept and reported per "
            "step; beyond it the head and the tail are kept with a marker of how many bytes "
            "were cut",
        ),
    ] = OUTPUT_MAX_BYTES
    freshness_window_s: Annotated[
        float, Meta(gt=0, le=FRESHNESS_MAX_S, description=FRESHNESS_DESCRIPTION)
    ] = wire.DEFAULT_FRESHNESS_S
    stop_grace_s: Annotated[
        float,
        Meta(
            ge=0,
            le=3600,
            description="On stop, how long running executions may finish before they are killed",
        ),
    ] = 5.0
    task_kill_grace_s: Annotated[
        float,
        Meta(
            ge=0,
            le=600,
            description="How long a task's processes get between SIGTERM and SIGKILL (timeout,"
            " processes left running, agent stop)",
        ),
    ] = 5.0
    task_umask: Annotated[
        str,
        Meta(
            pattern=r"^0?[0-7]{3}$",
            description="File mode creation mask of the tasks, octal (the agent's own is 077)",
        ),
    ] = "022"
    failover_after_s: Annotated[
        float,
        Meta(
            ge=0,
            le=86400,
            description="Register with the next of task_servers once every contact with ours has"
            " failed for this long (0: never fail over)",
        ),
    ] = 60.0
    failover_check_interval_s: Annotated[
        float,
        Meta(
            ge=0.1,
            le=3600,
            description="With several task_servers: how often to check that ours answers (GET"
            " /health, only when nothing else reached it meanwhile)",
        ),
    ] = 15.0
    default_task_request_interval_s: Annotated[
        TaskRequestIntervalS,
        Meta(description="Poll interval used until the task server hands down a policy"),
    ] = 1800
    ca_file: Annotated[
        Annotated[Path, Meta(extra_json_schema={"format": "file-path"})] | None,
        Meta(
            description="PEM CA bundle that verifies the task servers / gateway (unset: system "
            "store)"
        ),
    ] = None
    allow_plain_http: Annotated[
        bool,
        Meta(description="Call http:// task servers beyond loopback (token and tasks unencrypted)"),
    ] = False

    @classmethod
    def before_setting(cls, name: str, value: Any) -> Any:
        """A list from the environment or a flag: a JSON list or a comma-separated string."""
        if name in ("task_servers", "groups") and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError:
                    return value  # refused as not a list, naming the setting
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @classmethod
    def check_setting(cls, name: str, value: Any, valid: dict[str, Any]) -> Any:
        if name == "task_servers":
            return [check_http_url(url) for url in value]
        if name == "gateway_url":
            return check_http_url(value) if value else None
        if name == "ca_file":
            if value is not None and not value.is_file():
                raise ValueError("is not a file")
            return tls.check_ca_file(value)
        if name == "allow_plain_http" and not value:
            calling = {"task_servers": list(valid.get("task_servers", []))}
            if valid.get("gateway_url"):
                calling["gateway_url"] = [valid["gateway_url"]]
            problems = tls.plain_http_problems(calling=calling)
            if problems:
                raise ValueError(tls.plain_http_refusal(problems, "TICKLE_AGENT_"))
        if name == "enrollment_secret":
            if not value.strip():
                raise ValueError(
                    "is required: set --enrollment-secret, TICKLE_AGENT_ENROLLMENT_SECRET "
                    "or enrollment_secret in the config file"
                )
            return value.strip()
        return value

    def check_settings(self) -> None:
        if self.control_socket is None:
            self.control_socket = self.state_dir / "agent.sock"

    @property
    def socket_path(self) -> Path:
        """The control socket path (always set after validation)."""
        return self.control_socket or self.state_dir / "agent.sock"

    @property
    def api_urls(self) -> list[str]:
        """Where task-server calls go: the gateway in CEM mode when set, else the task servers."""
        if self.cem and self.gateway_url:
            return [self.gateway_url]
        return list(self.task_servers)

    @property
    def calls_https(self) -> bool:
        """Whether the agent calls a task server (or its gateway) over HTTPS."""
        return any(url.lower().startswith("https:") for url in self.api_urls)
