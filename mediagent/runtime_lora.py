"""Runtime LoRA loading, the client side: ``mediagent serve load`` / ``unload`` ask a server
started with ``--runtime-lora`` to add or drop an adapter, after the same checks as at start-up.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from mediagent.artifacts import Adapter, check_adapter
from mediagent.experiments import materialise, resolve
from mediagent.net import local_url
from mediagent.params import Params
from mediagent.vllm_command import ServeError, slot_targets


def server_call(url: str, route: str, body: dict, api_key: str | None, timeout_s: float = 300) -> tuple[int, str]:
    """POST JSON to the running server; (status, body text). Never through an http_proxy."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"{url}{route}", data=json.dumps(body).encode(), headers=headers, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServeError(
            f"no server answers at {url} ({reason}): start one with `make serve RUNTIME_LORA=1`, "
            f"or pass its --port / PORT="
        ) from exc


def _server_error(code: int, text: str, url: str) -> ServeError:
    """A refusal by the server, in words: the route missing means runtime loading is off."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = {}
    if code in (404, 405) and body.get("detail") in ("Not Found", "Method Not Allowed"):
        return ServeError(
            f"the server at {url} has runtime LoRA loading off: restart it with "
            f"`make serve RUNTIME_LORA=1` (--runtime-lora)"
        )
    if code == 401:
        return ServeError(f"the server at {url} refused the API key: set API_KEY to the key it was started with")
    message = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else None
    return ServeError(f"the server at {url} answered HTTP {code}: {message or text.strip()[:500]}")


def load_adapter(
    params: Params,
    exp: str | None = None,
    adapter: str | None = None,
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    max_lora_rank: int | None = None,
) -> tuple[str, Adapter]:
    """Check an adapter as the server would at start-up, then have the running server load it.

    Args:
        exp / adapter: a DVC experiment's name, or an adapter directory (exactly one).
        name: the model name clients use (default: the experiment's name, else the lineage name).
        max_lora_rank: the server's --max-lora-rank if it was started with one
            (default ``serve.runtime_max_lora_rank``, what ``--runtime-lora`` uses).
    Returns:
        The served name and the checked adapter.
    """
    if bool(exp) == bool(adapter):
        raise ServeError("load takes one of --exp NAME (EXP=) or --adapter DIR (ADAPTER=)")
    limit = max_lora_rank if max_lora_rank is not None else params.serve.runtime_max_lora_rank
    path = materialise(resolve([exp])[0], params.serve.experiments_dir) if exp else adapter
    a = check_adapter(path, params.model, limit)
    slots = slot_targets(params, [], runtime_lora=True)
    if slots and (a.target_modules is None or not set(a.target_modules) <= set(slots)):
        extra = (
            "modules named by a pattern"
            if a.target_modules is None
            else ", ".join(sorted(set(a.target_modules) - set(slots)))
        )
        raise ServeError(
            f"adapter {a.name} ({a.path}) adapts {extra}, but the server's LoRA slots adapt only "
            f"lora.target_modules ({', '.join(slots)}): vLLM would serve those weights as the base; "
            f"retrain within lora.target_modules, or add them there and restart the server"
        )
    name = name or exp or a.name
    url = local_url(host or params.serve.host, port or params.serve.port)
    code, text = server_call(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(a.path)}, api_key)
    if code != 200:
        raise _server_error(code, text, url)
    return name, a


def unload_adapter(
    params: Params, name: str, host: str | None = None, port: int | None = None, api_key: str | None = None
) -> None:
    """Have the running server drop the adapter served as ``name``; requests to it then get 404."""
    url = local_url(host or params.serve.host, port or params.serve.port)
    code, text = server_call(url, "/v1/unload_lora_adapter", {"lora_name": name}, api_key)
    if code != 200:
        raise _server_error(code, text, url)
