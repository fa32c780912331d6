"""The notification server's settings (`TICKLE_NS_*`, flags `--field-name`, TOML config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from tickle import tls
from tickle.config import (
    ApiServerSettings,
    TickleSenderSettings,
    default_state_dir,
    read_or_create_secret,
)
from tickle.messages import RUN_EXPIRY_MAX_S, Port


class NsSettings(ApiServerSettings, TickleSenderSettings):
    """Everything `tickle ns` reads at start; each default works on one machine."""

    model_config = SettingsConfigDict(
        env_prefix="TICKLE_NS_", extra="forbid", validate_default=True
    )

    api_host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on")
    api_port: Port = Field(default=50120, description="Port the HTTP API listens on")
    state_dir: Path = Field(
        default_factory=lambda: default_state_dir("ns"),
        description="Directory for the database and generated secrets",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; unset: sqlite:///{state_dir}/ns.db (PostgreSQL via psycopg)",
    )
    admin_token: str | None = Field(
        default=None,
        min_length=16,
        description="Operator token; unset: generated once into {state_dir}/admin-token",
    )
    enrollment_secret: str | None = Field(
        default=None,
        min_length=16,
        description="Task servers' enrollment secret (agents have their own, which task servers "
        "check); unset: {state_dir}/enrollment-secret",
    )
    registration_approval: Literal["auto", "manual"] = Field(
        default="auto",
        description="manual: a new agent or task server gets no credentials until an operator "
        "approves it (tickle computers / task-servers approve NAME)",
    )
    ns_id: str = Field(
        default="ns", min_length=1, max_length=64, description="Sender id in NS tickles"
    )
    dispatcher_lock: bool = Field(
        default=True,
        description="PostgreSQL: only the holder of an advisory lock dispatches tickles",
    )
    dispatch_poll_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often the tickle server looks in the database for untickled work",
    )
    offline_intervals: float = Field(
        default=2.0,
        ge=1.0,
        le=100.0,
        description="A computer is offline after this many Task Request Intervals without contact"
        " (plus offline_slack_s)",
    )
    offline_slack_s: float = Field(
        default=60.0,
        ge=0.0,
        le=86400.0,
        description="Added to the offline bound: covers the task servers' contact reports",
    )
    default_run_expiry_s: float | None = Field(
        default=None,
        gt=0,
        le=RUN_EXPIRY_MAX_S,
        description="Executions of a run not started this long after it end `expired`, unless "
        "the run says otherwise (unset: runs do not expire)",
    )
    lost_after_intervals: float = Field(
        default=2.0,
        ge=1.0,
        le=100.0,
        description="An execution is `lost` when neither it nor its computer was heard from for "
        "this many Task Request Intervals plus lost_grace_s (a running one: counted from when "
        "its steps' timeouts would have ended it)",
    )
    lost_grace_s: float = Field(
        default=60.0, ge=0, le=86400, description="Added to the bound of lost_after_intervals (s)"
    )
    sweep_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often the active tickle dispatcher ends expired and lost executions (s)",
    )
    console_session_s: int = Field(
        default=28800,
        ge=60,
        le=7 * 86400,
        description="How long a web console login lasts (seconds) before it must log in again",
    )
    tls_cert_file: FilePath | None = Field(
        default=None,
        description="PEM certificate (chain) the API serves HTTPS with; set with tls_key_file",
    )
    tls_key_file: FilePath | None = Field(
        default=None, description="PEM private key of tls_cert_file (unset: plain HTTP)"
    )
    allow_plain_http: bool = Field(
        default=False,
        description="Serve plain HTTP on a non-loopback api_host (tokens travel unencrypted)",
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            url = make_url(value.replace("{state_dir}", "/"))
            url.get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            raise ValueError(f"not a usable SQLAlchemy database URL: {exc}") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(
                f"the notification server keeps its data in SQLite or PostgreSQL, "
                f"not {url.get_backend_name()}"
            )
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert_file" in info.data:
            tls.check_server_pair(info.data["tls_cert_file"], value)
        return value

    @field_validator("allow_plain_http")
    @classmethod
    def _plain_http_chosen(cls, value: bool, info: ValidationInfo) -> bool:
        # a field validator (not a model one) so the message names allow_plain_http itself
        if value or info.data.get("tls_cert_file") or "api_host" not in info.data:
            return value
        problems = tls.plain_http_problems(serving={"api_host": info.data["api_host"]})
        if problems:
            raise ValueError(tls.plain_http_refusal(problems, "TICKLE_NS_"))
        return value

    @property
    def db_url(self) -> str:
        """The database URL, defaulting to SQLite in the state directory."""
        url = self.database_url or "sqlite:///{state_dir}/ns.db"
        return url.replace("{state_dir}", str(self.state_dir))

    @property
    def admin_token_file(self) -> Path:
        return self.state_dir / "admin-token"

    def with_secrets(self) -> NsSettings:
        """A copy whose unset secrets are read from, or generated once into, the state dir."""
        if self.admin_token and self.enrollment_secret:
            return self
        return self.model_copy(
            update={
                "admin_token": self.admin_token or read_or_create_secret(self.admin_token_file),
                "enrollment_secret": self.enrollment_secret
                or read_or_create_secret(self.state_dir / "enrollment-secret"),
            }
        )

    def public(self) -> dict[str, Any]:
        """The settings without secrets (for logs)."""
        return self.model_dump(exclude={"admin_token", "enrollment_secret"})
