"""The task server's settings (`tickle task-server`, environment prefix `TICKLE_TS_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, FilePath, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from tickle import tls
from tickle.config import (
    ApiServerSettings,
    TickleSenderSettings,
    check_http_url,
    default_state_dir,
    hostname,
)
from tickle.messages import Name


class TaskServerSettings(ApiServerSettings, TickleSenderSettings):
    """Everything the task server reads at start; see docs/ARCHITECTURE.md."""

    model_config = SettingsConfigDict(
        env_prefix="TICKLE_TS_", extra="forbid", validate_default=True
    )

    name: Name = Field(default_factory=hostname, description="This task server's name at the NS")
    ns_url: str = Field(
        default="http://127.0.0.1:50120", min_length=1, description="Notification server API URL"
    )
    enrollment_secret: SecretStr = Field(
        min_length=1,
        max_length=512,
        description="Task servers' enrollment secret: registers this task server with the NS "
        "(required)",
    )
    agent_enrollment_secret: SecretStr = Field(
        min_length=1,
        max_length=512,
        description="Agents' enrollment secret: an agent registering here must present it "
        "(required; not the task servers' one)",
    )
    api_host: str = Field(default="127.0.0.1", description="Agent-facing API listen address")
    api_port: int = Field(default=50121, ge=0, le=65535, description="Agent-facing API port")
    tickle_host: str = Field(default="0.0.0.0", description="UDP address for NS tickles")
    tickle_port: int = Field(default=50123, ge=0, le=65535, description="UDP port for NS tickles")
    advertise_host: str | None = Field(
        default=None,
        description="Address the NS tickles (default: tickle_host, or 127.0.0.1 for 0.0.0.0)",
    )
    advertise_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="UDP port the NS tickles (default: the tickle_port bound)",
    )
    agent_tickle_rate: float = Field(
        default=10000.0,
        ge=1,
        le=1_000_000,
        description="Tickles per second sent to agents at most (first sends and resends): a "
        "run-now on thousands of agents wakes them no faster than their pulls can be served "
        "(agent_tickle_window follows the pulls served; at 5,000 this capped one task server's "
        "2,500 agents at ~4,950 pulls/s where it served 5,200-5,350)",
    )
    agent_tickle_window: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Tickles sent to agents and not yet answered by a pull at most (first "
        "sends; one resent no longer counts): the next waits for a pull, so tickles follow the "
        "pulls served",
    )
    agent_tickle_window_initial: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="The places in agent_tickle_window the tickles open with (with "
        "agent_tickle_window_target_s: default 32). "
        "With agent_tickle_window_target_s 0: a slow start, each burst of tickles opening with "
        "this many, each pull served opening half a place more (default: the whole window)",
    )
    agent_tickle_window_target_s: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="Delay-based tickle window: from agent_tickle_window_initial places it "
        "opens (up to agent_tickle_window) while the agents' pulls come within this of the "
        "quickest tickle → pull time (the agent's own once known), and closes back as they wait "
        "longer, so a server serving its pulls slowly (just restarted, short of CPU) is not sent "
        "the whole window at once (0.5 s, 2,500 agents: a task-server restart's requests per "
        "second peak / mean 1.20-1.36, not 2.12-3.25, but 5 % more CPU per agent in a "
        "5,000-agent run, its simulated agents and NS most). 0: a fixed window",
    )
    pulls_first_s: float = Field(
        default=2.5,
        ge=0,
        le=5,
        description="How long at most the agents' status events, and the task server's hop "
        "and state reports, wait while tickled agents' pulls are due: the events an agent "
        "posts after its pull are served after, the others commit together after; a run-now's "
        "pulls are served first (2,500 agents of one task server: ~4,100-4,600 pulls/s, not "
        "~2,000), and at the pace of the pulls throughout (with 1 s, 10,000 agents over 4 task "
        "servers on 2 cores took their events in after 1 s, and the pulls slowed by half; 2.5 s "
        "and 5 s read the same there, 6.02-7.92 s against 6.16-7.99 s, alternated). "
        "Below the agents' 10 s request timeout; an agent whose pull leaves none due, or that "
        "posts alone, is never held. The state reports then wait, as long again at most, "
        "while the status events go to the NS: the operator waits for those (10,000 agents' "
        "first reachability and clocks were 15 % of the NS's work in a run-now). 0: "
        "events are served and committed as they come",
    )
    api_url: str | None = Field(
        default=None,
        description="URL agents use (default http(s)://{advertise_host}:{api_port})",
    )
    state_dir: Path = Field(
        default_factory=lambda: default_state_dir("task-server"),
        description="Directory of the credentials, clients, work cache and event outbox",
    )
    ns_check_interval_s: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="Periodic work check with the NS until the NS hands down its own interval",
    )
    max_long_polls: int = Field(
        default=20_000,
        ge=0,
        le=1_000_000,
        description="Agents' long-polls waiting at once (beside max_connections; the NS's "
        "long_poll setting turns them on); one more is refused and its agent polls",
    )
    contact_report_interval_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="How often the agents' contacts (last contact, settings version) are reported"
        " to the NS, in one batch",
    )
    ns_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Timeout of one request to the NS"
    )
    ns_wait_s: float = Field(
        default=300.0,
        ge=0,
        description="How long to keep trying an unreachable NS at start (0: forever)",
    )
    tls_cert_file: FilePath | None = Field(
        default=None,
        description="PEM certificate (chain) the agent API serves HTTPS with; with tls_key_file",
    )
    tls_key_file: FilePath | None = Field(
        default=None, description="PEM private key of tls_cert_file (unset: plain HTTP)"
    )
    ns_ca_file: FilePath | None = Field(
        default=None,
        description="PEM CA bundle that verifies the NS certificate (unset: system trust store)",
    )
    allow_plain_http: bool = Field(
        default=False,
        description="Serve or call plain HTTP beyond loopback (tokens travel unencrypted)",
    )

    @field_validator("agent_enrollment_secret")
    @classmethod
    def _apart_from_the_ts_secret(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # one secret for both would let any agent register as a task server and take its clients
        ours = info.data.get("enrollment_secret")
        if ours is not None and value.get_secret_value() == ours.get_secret_value():
            raise ValueError("must differ from enrollment_secret (the task servers' secret)")
        return value

    @field_validator("ns_url")
    @classmethod
    def _ns_url_is_http(cls, value: str) -> str:
        # caught here, not as an NS that stays "unreachable" for ns_wait_s after binding
        check_http_url(value)
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert_file" in info.data:
            tls.check_server_pair(info.data["tls_cert_file"], value)
        return value

    @field_validator("ns_ca_file")
    @classmethod
    def _ca_loads(cls, value: Path | None) -> Path | None:
        return tls.check_ca_file(value)

    @field_validator("allow_plain_http")
    @classmethod
    def _plain_http_chosen(cls, value: bool, info: ValidationInfo) -> bool:
        # a field validator (not a model one) so the message names allow_plain_http itself
        if value:
            return value
        serving = {}
        if not info.data.get("tls_cert_file") and "api_host" in info.data:
            serving["api_host"] = info.data["api_host"]
        calling = {"ns_url": [info.data["ns_url"]]} if "ns_url" in info.data else {}
        problems = tls.plain_http_problems(serving=serving, calling=calling)
        if problems:
            raise ValueError(tls.plain_http_refusal(problems, "TICKLE_TS_"))
        return value

    @property
    def advertised_host(self) -> str:
        """The address the NS sends tickles to."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.tickle_host in ("0.0.0.0", "::", "") else self.tickle_host

    def agent_api_url(self, api_port: int) -> str:
        """The URL agents use, given the port the API really bound."""
        scheme = "https" if self.tls_cert_file else "http"
        return self.api_url or f"{scheme}://{self.advertised_host}:{api_port}"
