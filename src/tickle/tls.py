"""HTTPS for the component APIs: certificate checks and the plain-HTTP rule, shared by all three.

A component serves HTTPS when it has a certificate and key (`tls_cert_file`, `tls_key_file`) and
verifies the servers it calls against a CA bundle (`ca_file`, `ns_ca_file`; default: the system
trust store). Verification is never turned off. Plain HTTP is allowed on loopback (one machine,
`make demo`); anywhere else it needs the explicit `allow_plain_http = true`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported where used: a plain-HTTP agent runs without it (tickle.agent.start)
    import ssl

PLAIN_HTTP_SETTING = "allow_plain_http"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); False for 0.0.0.0."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_problems(
    *, serving: dict[str, str] | None = None, calling: dict[str, list[str]] | None = None
) -> list[str]:
    """What would go over plain HTTP beyond loopback: served hosts, called `http://` URLs.

    `serving` maps a setting to the host a plain-HTTP API listens on (pass only when no
    certificate is set); `calling` maps a setting to the URLs the component calls.
    """
    problems = []
    for setting, host in (serving or {}).items():
        if not is_loopback(host):
            problems.append(
                f"{setting} {host} would serve plain HTTP beyond loopback"
                " (set tls_cert_file and tls_key_file to serve HTTPS)"
            )
    for setting, urls in (calling or {}).items():
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
                problems.append(f"{setting} {url} is plain HTTP to a host beyond loopback")
    return problems


def plain_http_refusal(problems: list[str], env_prefix: str) -> str:
    """The message a component stops with when plain HTTP beyond loopback was not chosen."""
    env = f"{env_prefix}{PLAIN_HTTP_SETTING.upper()}"
    return (
        "; ".join(problems)
        + f": use https, or set {PLAIN_HTTP_SETTING} = true (--allow-plain-http, {env})"
        " to send tokens and tasks unencrypted on purpose"
    )


def check_server_pair(cert_file: Path | None, key_file: Path | None) -> None:
    """Both or neither; when both, they must load as a PEM certificate chain and its key."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
    if cert_file is None or key_file is None:
        return
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load the certificate {cert_file} with the key {key_file}: {exc}"
        ) from None


def check_ca_file(ca_file: Path | None) -> Path | None:
    """The CA bundle must load as PEM certificates (None: the system trust store)."""
    if ca_file is not None:
        client_ssl(ca_file)
    return ca_file


def client_ssl(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context: the private CA bundle when given, else the system store."""
    import ssl

    try:
        if ca_file is None:
            return ssl.create_default_context()
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the CA bundle {ca_file}: {exc}") from None
