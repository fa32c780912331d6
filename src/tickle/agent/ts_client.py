"""The agent's HTTP client of its task server: register, pull tasks, read the policy, send events.

Registration tries each URL of `task_servers` in order and the first reachable one wins; every
later call goes to the task server the agent registered with (or the CEM gateway). A 401 means the
task server no longer knows the agent's token: the agent registers again and retries once.

Every call notes whether the task server answered: `unreachable_for()` says how long every contact
has failed, and `fail_over()` registers with the next task server of the list (see failover.py).

Every request carries the agent's time and every answer the task server's (`X-Tickle-Time`): the
task server measures the agent's clock, and `clock_offset_s` is the agent's own measure of how far
its clock is off the task server's.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any, TypeVar

from tickle.agent.address import client_local_addr, tickle_address
from tickle.agent.h11http import HttpClient
from tickle.agent.settings import AgentSettings
from tickle.agent.state import AgentState, Credentials
from tickle.agentapi import (
    AgentEnrollment,
    AgentPolicy,
    AgentRegister,
    AgentTasks,
    Body,
    EventAck,
    EventBatch,
    PolicyVia,
    PullVia,
    StatusEvent,
    decode,
    encode,
)
from tickle.clock import Clock, OffsetEstimator
from tickle.httpbase import ApiError, api_error
from tickle.tls import client_ssl

log = logging.getLogger(__name__)
# answers to an event batch that no retry can change: the task server refuses one of its events
REFUSED_FOR_GOOD = frozenset({403, 422})
# a batch over the task server's max_body_bytes: sent again in parts (one event always fits)
TOO_LARGE = 413

# how long past its timeout the agent waits for a long-poll's answer before it gives up on it
LONG_POLL_GRACE_S = 15.0

M = TypeVar("M", bound=Body)
# the one peer whose clock the agent measures: its current task server
_TS = "task-server"


class NotRegistered(Exception):
    """No task server accepted the registration (all unreachable or refusing).

    `retry_after_s`: the longest `Retry-After` a busy task server answered (0: none said one).
    """

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TaskServerClient:
    """One HTTP client of the task server, bound to the tickle address when it is specific."""

    def __init__(
        self,
        settings: AgentSettings,
        state: AgentState,
        timeout_s: float = 10.0,
        clock: Clock = time.time,
    ) -> None:
        self._settings = settings
        self._clock = clock
        # samples of the task server's offset from us, from the time on its answers
        self._ts_clock = OffsetEstimator()
        self._state = state
        self._timeout_s = timeout_s
        self._http_client: HttpClient | None = None
        self._creds: Credentials | None = state.current_credentials(
            settings.api_urls, settings.name
        )
        self._register_lock = asyncio.Lock()
        self.reported_address: str | None = None
        # monotonic time of the first failed contact since the last answer (None: it answers)
        self._failing_since: float | None = None
        self.last_answer_at: float | None = None
        # the settings version this agent has, told to the task server on each contact
        self.settings_version: int | None = None

    async def start(self) -> None:
        local_addr = client_local_addr(self._settings)
        # verification is never off: the private CA (ca_file) or the system trust store. Built
        # only for a task server called over HTTPS (the system store alone is 2.5 MB of memory)
        ssl_context = client_ssl(self._settings.ca_file) if self._settings.calls_https else None
        self._http_client = HttpClient(
            timeout_s=self._timeout_s, ssl_context=ssl_context, local_addr=local_addr,
            clock=self._clock, on_offset=self._ts_offset_sample,
        )  # fmt: skip

    async def close(self) -> None:
        if self._http_client is not None:
            await self._http_client.close()
            self._http_client = None

    @property
    def credentials(self) -> Credentials | None:
        return self._creds

    @property
    def clock_offset_s(self) -> float | None:
        """How far our clock is ahead of our task server's (None: no answer measured yet)."""
        theirs = self._ts_clock.offset(_TS)
        return None if theirs is None else -theirs

    @property
    def has_alternatives(self) -> bool:
        """Whether there is another task server to fail over to."""
        return len(self._settings.api_urls) > 1

    def tickle_keys(self) -> dict[str, bytes]:
        """{task server name: tickle key} for the TickleGuard."""
        if self._creds is None:
            return {}
        return {self._creds.ts_name: base64.b64decode(self._creds.tickle_key)}

    async def ensure_registered(self) -> Credentials:
        """The stored credentials, registering first when there are none."""
        if self._creds is not None:
            return self._creds
        await self.register()
        assert self._creds is not None
        return self._creds

    async def register(self, urls: list[str] | None = None) -> AgentEnrollment:
        """Register with the first reachable task server; store the credentials and policy.

        `urls` (default: the configured list) are tried in order, each once.
        """
        errors: list[str] = []
        retry_after = 0.0
        for url in self._settings.api_urls if urls is None else urls:
            address = await tickle_address(self._settings, url)
            self.reported_address = address
            body = AgentRegister(
                enrollment_secret=self._settings.enrollment_secret,
                name=self._settings.name,
                tickle_host=None if self._settings.cem else address,
                tickle_port=self._settings.advertise_port or self._settings.tickle_port,
                cem=self._settings.cem,
                reported_address=address,
                groups=self._settings.groups,
                identity=self._state.identity(),
            )
            self._ts_clock.forget(_TS)  # maybe another task server: its clock is measured anew
            try:
                enrollment: AgentEnrollment = await self._request(
                    "POST", f"{url}/api/agent/register", AgentEnrollment, body=body
                )
            except ApiError as exc:
                # refused (awaiting approval, rejected, our name held by another agent...): said
                # once here, in the task server's and the NS's words
                refused = "refused the registration" if exc.status < 500 else "failed"
                log.warning("task server %s %s: %s", url, refused, exc.detail)
                errors.append(f"{url}: HTTP {exc.status}")
                retry_after = max(retry_after, exc.retry_after_s or 0.0)
                continue
            except (OSError, TimeoutError) as exc:
                log.warning("registration with %s failed: %s", url, exc)
                errors.append(f"{url}: {exc}")
                continue
            self._creds = Credentials(
                url=url,
                ts_name=enrollment.ts_name,
                name=enrollment.name,
                token=enrollment.token,
                tickle_key=enrollment.tickle_key,
                registered_at=time.time(),
            )
            self._state.save_credentials(self._creds)
            self._state.save_policy(enrollment.policy)
            self._answered()
            log.info("registered with task server %s at %s", enrollment.ts_name, url)
            return enrollment
        raise NotRegistered("; ".join(errors) or "no task server configured", retry_after)

    async def fail_over(self) -> AgentEnrollment | None:
        """Register with the next reachable task server after ours, in list order (wrapping).

        Ours is tried last (it may be back). None when there is no other task server; raises
        NotRegistered when none answered, keeping the current credentials.
        """
        urls = self._settings.api_urls
        creds = self._creds
        if len(urls) < 2:
            return None
        start = urls.index(creds.url) + 1 if creds is not None and creds.url in urls else 0
        order = urls[start:] + urls[:start]
        async with self._register_lock:
            if self._creds is not creds:  # someone registered meanwhile (a 401): done
                return None
            log.warning(
                "task server %s unreachable for %.0fs: failing over (trying %s)",
                creds.ts_name if creds else "?", self.unreachable_for(), ", ".join(order),
            )  # fmt: skip
            return await self.register(order)

    def unreachable_for(self) -> float:
        """Seconds since the first of the contacts that failed in a row (0: the last answered)."""
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since

    async def check(self) -> bool:
        """Ask the current task server for /health; True when it answered 200.

        Only no answer (or a 5xx) counts as a failed contact; any other answer shows it is up.
        """
        creds = self._creds
        if creds is None:
            return False
        try:
            await self._request("GET", f"{creds.url}/health", None)
        except (OSError, TimeoutError, ApiError) as exc:
            if not _unreachable(exc):
                self._answered()  # it answered, if oddly: it is up
                return False
            log.info("task server %s did not answer its health check: %s", creds.ts_name, exc)
            self._failed()
            return False
        self._answered()
        return True

    async def tasks(self, via: PullVia) -> AgentTasks:
        """The pull: this agent's unfinished executions and the current policy."""
        return await self._call("GET", "/api/agent/tasks", AgentTasks, params=self._params(via))

    async def wait_for_tasks(self, timeout_s: float) -> AgentTasks | None:
        """The long-poll: the pull, as soon as something arrives for this agent at the task
        server; None when nothing did within its `timeout_s` (the task server's bound)."""
        # the task server answers by its bound: ours only catches one that never does
        answer: AgentTasks | None = await self._call(
            "GET", "/api/agent/tasks/wait", AgentTasks, params=self._params(),
            time_limit=timeout_s + LONG_POLL_GRACE_S,
        )  # fmt: skip
        return answer

    async def policy(self, via: PolicyVia = "refresh") -> AgentPolicy:
        """The configuration policy only (never tasks); `via="tickle"` acks a settings tickle."""
        return await self._call("GET", "/api/agent/policy", AgentPolicy, params=self._params(via))

    async def events(self, bodies: list[str]) -> list[str]:
        """Send serialized status events; return the ids the outbox may drop.

        Those are the ids the task server accepted, and an event it refuses for good (403, 422):
        kept, it would be the oldest batch forever and block every later event. A refused batch
        is split; a single refused event is logged as an error and dropped. A batch too large
        for the task server (413) is split too.
        """
        events = [decode(b, StatusEvent) for b in bodies]
        try:
            ack = await self._call(
                "POST", "/api/agent/events", EventAck, body=EventBatch(events=events),
                params=self._params(),
            )  # fmt: skip
        except ApiError as exc:
            if exc.status == TOO_LARGE and len(events) == 1:
                smaller = events[0].without_output()
                if smaller is not None:  # alone too large: its output goes, its status gets through
                    log.error("status event %s is over the task server's body limit: its"
                              " output is dropped", events[0].event_id)  # fmt: skip
                    return await self.events([encode(smaller).decode()])
            too_large = exc.status == TOO_LARGE and len(events) > 1
            if exc.status not in REFUSED_FOR_GOOD and not too_large:
                raise
            if len(events) == 1:
                log.error("the task server refused status event %s for good (%s): dropped",
                          _fields(events[0]), exc)  # fmt: skip
                return [events[0].event_id]
            dropped: list[str] = []
            for body in bodies:
                dropped += await self.events([body])
            return dropped
        return ack.accepted

    async def _call(
        self,
        method: str,
        path: str,
        answer: type[M],
        body: Body | None = None,
        params: dict[str, str] | None = None,
        time_limit: float | None = None,
    ) -> M:
        creds = await self.ensure_registered()
        try:
            return await self._send(creds, method, path, answer, body, params, time_limit)
        except ApiError as exc:
            if exc.status != 401:
                raise
            log.warning("task server %s refused our token: registering again", creds.ts_name)
        async with self._register_lock:
            if self._creds is creds:  # nobody registered again meanwhile
                await self.register()
            creds = await self.ensure_registered()
        return await self._send(creds, method, path, answer, body, params, time_limit)

    async def _send(
        self,
        creds: Credentials,
        method: str,
        path: str,
        answer: type[M],
        body: Body | None,
        params: dict[str, str] | None,
        time_limit: float | None = None,
    ) -> M:
        try:
            result: M = await self._request(
                method, f"{creds.url}{path}", answer, body=body, params=params,
                token=creds.token, time_limit=time_limit,
            )  # fmt: skip
        except Exception as exc:
            if _unreachable(exc):
                self._failed()
            else:
                self._answered()  # an answer, even a refusal, proves it is up
            raise
        self._answered()
        return result

    def _ts_offset_sample(self, offset_s: float) -> None:
        self._ts_clock.add(_TS, offset_s)

    def _params(self, via: str | None = None) -> dict[str, str]:
        params = {} if via is None else {"via": via}
        if self.settings_version is not None:
            params["settings_version"] = str(self.settings_version)
        return params

    def _answered(self) -> None:
        self._failing_since = None
        self.last_answer_at = time.monotonic()

    def _failed(self) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    async def _request(
        self,
        method: str,
        url: str,
        answer: type[M] | None,
        body: Body | None = None,
        params: dict[str, str] | None = None,
        token: str | None = None,
        time_limit: float | None = None,
    ) -> Any:
        """Send a request with a JSON body; its answer parsed into `answer` (None: not parsed).
        ApiError for a status of 300 or more; `time_limit`: this request's, not the client's."""
        if self._http_client is None:
            raise RuntimeError("TaskServerClient used before start()")
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        resp = await self._http_client.request(
            method, url, body=None if body is None else encode(body),
            params=params, headers=headers, timeout_s=time_limit,
        )  # fmt: skip
        # a redirect is refused, not followed: our token goes to our task server only
        if resp.status >= 300:
            raise api_error(resp.status, resp.body, url, resp.headers.get("retry-after"))
        if answer is None or resp.status == 204:
            return None
        return decode(resp.body, answer)


def _fields(event: StatusEvent) -> str:
    """An event's fields as a log line shows them: `event_id='…' execution_id=5 …`."""
    return " ".join(f"{name}={getattr(event, name)!r}" for name in event.__struct_fields__)


def _unreachable(exc: BaseException) -> bool:
    """Whether a failed call means the task server is down (no answer, or a 5xx)."""
    if isinstance(exc, ApiError):
        return exc.status >= 500
    return isinstance(exc, (OSError, TimeoutError))
