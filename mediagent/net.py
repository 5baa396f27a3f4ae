"""Small network rules shared by the server, the clients and the review app."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# A wildcard bind is reached from this machine on loopback.
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def is_loopback(host: str) -> bool:
    """True for loopback names and addresses; a host name could resolve anywhere, so False."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to host:port."""
    host = _WILDCARD.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def describe_openai_error(exc: Exception, url: str, start_hint: str, key_hint: str) -> str | None:
    """One line for an error of the OpenAI client talking to our server, or None if it is not one.

    Args:
        start_hint: what to do when no server answers (e.g. "start one with `make serve`").
        key_hint: how to pass the API key for this client.
    """
    import openai  # only the clients need it

    if isinstance(exc, openai.APIConnectionError):
        return f"no model server at {url}: {start_hint}"
    if isinstance(exc, openai.AuthenticationError):
        return f"the model server at {url} wants an API key: {key_hint}"
    if isinstance(exc, openai.APIStatusError):
        return f"the model server at {url} said {exc.status_code}: {exc.message}"
    return None
