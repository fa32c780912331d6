"""The agent's settings (`TICKLE_AGENT_*`): one typed object read once at start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, FilePath, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from tickle import tls
from tickle.config import (
    ComponentSettings,
    FreshnessWindowS,
    check_http_url,
    default_state_dir,
    hostname,
)
from tickle.messages import OUTPUT_MAX_BYTES, OUTPUT_TAIL_MAX, Name, TaskRequestIntervalS

DEFAULT_TASK_SERVER = "http://127.0.0.1:50121"


class AgentSettings(ComponentSettings):
    """Settings of the Client Task Agent (flags, `TICKLE_AGENT_*` environment, TOML file)."""

    model_config = SettingsConfigDict(
        env_prefix="TICKLE_AGENT_", extra="forbid", validate_default=True
    )

    name: Name = Field(default_factory=hostname, description="This computer's name")
    task_servers: Annotated[list[str], NoDecode] = Field(
        default=[DEFAULT_TASK_SERVER],
        min_length=1,
        description="Task server URLs, first reachable wins (JSON list or comma-separated)",
    )
    enrollment_secret: str = Field(
        default="",
        description="Agents' enrollment secret, which lets the agent register with a task server",
    )
    groups: Annotated[list[Name], NoDecode] = Field(
        default_factory=list, description="Groups reported at registration (JSON or comma list)"
    )
    cem: bool = Field(default=False, description="Cloud-enabled mode: no tickle listener, poll")
    gateway_url: str | None = Field(
        default=None, description="CEM: send every task-server call to this URL instead"
    )
    tickle_host: str = Field(default="0.0.0.0", description="Address the tickle listener binds")
    tickle_port: int = Field(default=50124, ge=1, le=65535, description="Tickle UDP port")
    advertise_host: str | None = Field(
        default=None,
        description="Address the task server tickles (default: routing-table source address)",
    )
    advertise_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port the task server tickles (default: tickle_port; for port forwarding)",
    )
    state_dir: Path = Field(
        default_factory=lambda: default_state_dir("agent"), description="Agent state directory"
    )
    control_socket: Path | None = Field(
        default=None, description="Unix socket of the control API (default {state_dir}/agent.sock)"
    )
    metrics_host: str = Field(default="127.0.0.1", description="Metrics HTTP address")
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Metrics HTTP port (0: control socket only)"
    )
    output_tail_bytes: int = Field(
        default=OUTPUT_TAIL_MAX,
        ge=0,
        le=OUTPUT_TAIL_MAX,
        description="Bytes of a step's last output (stdout and stderr as they came) shown in "
        "the run's summary",
    )
    output_max_bytes: int = Field(
        default=OUTPUT_MAX_BYTES,
        ge=1024,
        le=OUTPUT_MAX_BYTES,
        description="Bytes of output (stdout and stderr together) kept and reported per step; "
        "beyond it the head and the tail are kept with a marker of how many bytes were cut",
    )
    freshness_window_s: FreshnessWindowS
    stop_grace_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="On stop, how long running executions may finish before they are killed",
    )
    task_kill_grace_s: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="How long a task's processes get between SIGTERM and SIGKILL (timeout,"
        " processes left running, agent stop)",
    )
    task_umask: str = Field(
        default="022",
        pattern=r"^0?[0-7]{3}$",
        description="File mode creation mask of the tasks, octal (the agent's own is 077)",
    )
    failover_after_s: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description="Register with the next of task_servers once every contact with ours has"
        " failed for this long (0: never fail over)",
    )
    failover_check_interval_s: float = Field(
        default=15.0,
        ge=0.1,
        le=3600,
        description="With several task_servers: how often to check that ours answers (GET"
        " /health, only when nothing else reached it meanwhile)",
    )
    default_task_request_interval_s: TaskRequestIntervalS = Field(
        default=1800, description="Poll interval used until the task server hands down a policy"
    )
    ca_file: FilePath | None = Field(
        default=None,
        description="PEM CA bundle that verifies the task servers / gateway (unset: system store)",
    )
    allow_plain_http: bool = Field(
        default=False,
        description="Call http:// task servers beyond loopback (token and tasks unencrypted)",
    )

    @field_validator("task_servers", "groups", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Accept a JSON list or a comma-separated string (environment, flags)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("task_servers")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return [check_http_url(url) for url in value]

    @field_validator("gateway_url")
    @classmethod
    def _check_gateway(cls, value: str | None) -> str | None:
        return check_http_url(value) if value else None

    @field_validator("ca_file")
    @classmethod
    def _ca_loads(cls, value: Path | None) -> Path | None:
        return tls.check_ca_file(value)

    @field_validator("allow_plain_http")
    @classmethod
    def _plain_http_chosen(cls, value: bool, info: ValidationInfo) -> bool:
        # a field validator (not a model one) so the message names allow_plain_http itself
        if value:
            return value
        calling = {"task_servers": list(info.data.get("task_servers", []))}
        if info.data.get("gateway_url"):
            calling["gateway_url"] = [info.data["gateway_url"]]
        problems = tls.plain_http_problems(calling=calling)
        if problems:
            raise ValueError(tls.plain_http_refusal(problems, "TICKLE_AGENT_"))
        return value

    @field_validator("enrollment_secret")
    @classmethod
    def _secret_required(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "is required: set --enrollment-secret, TICKLE_AGENT_ENROLLMENT_SECRET "
                "or enrollment_secret in the config file"
            )
        return value.strip()

    @model_validator(mode="after")
    def _default_socket(self) -> AgentSettings:
        if self.control_socket is None:
            self.control_socket = self.state_dir / "agent.sock"
        return self

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
