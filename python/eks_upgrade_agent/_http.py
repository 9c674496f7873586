"""Talking to a server (``eks-upgrade-agent serve``) with the standard library only."""

from __future__ import annotations

import json
import threading
import urllib.error
import os
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, Optional, Tuple

from .errors import BackendError, InvalidInputError, error_from


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def _is_loopback(host: Optional[str]) -> bool:
    import ipaddress
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Http:
    def __init__(self, base: str, token: Optional[str] = None, timeout: float = 60.0):
        # A token or credentials in the URL travel in clear text over plain http: only to this
        # machine (the rule of the Rust client, RemoteStore::new).
        parts = urllib.parse.urlsplit(base)
        creds = "@" in parts.netloc
        allow_raw = os.environ.get("EUA_ALLOW_PLAIN_HTTP", "")
        if allow_raw not in ("", "0", "false", "1", "true"):
            raise InvalidInputError(
                f"EUA_ALLOW_PLAIN_HTTP must be 1 or 0, not {allow_raw!r}")
        allow = allow_raw in ("1", "true")
        if (parts.scheme.lower() == "http" and (creds or token) and not allow
                and not _is_loopback(parts.hostname)):
            what = "the URL's credentials" if creds else "the token"
            shown = base if not creds else f"{parts.scheme}://***@{parts.netloc.rsplit('@', 1)[1]}"
            raise InvalidInputError(
                f"refusing to send {what} to the server at {shown} over plain http: use https:// "
                "(plain http with credentials is only for localhost, 127.0.0.0/8, [::1]; set "
                "EUA_ALLOW_PLAIN_HTTP=1 if the network encrypts the hop, e.g. a service mesh)")
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
                 headers: Optional[Dict[str, str]] = None) -> urllib.request.Request:
        h = {"Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        data = None
        if raw is not None:
            data = raw
            h["Content-Type"] = "application/octet-stream"
        elif body is not None or method == "POST":
            try:
                data = json.dumps(body if body is not None else {}, default=str, allow_nan=False).encode()
            except ValueError as e:
                raise InvalidInputError(
                    f"cannot send this request: {e}; details and metadata must hold finite numbers, "
                    "strings, booleans, None, lists and dicts"
                ) from None
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        return urllib.request.Request(self.base + path, data=data, method=method, headers=h)

    def call(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None) -> Tuple[Any, Dict[str, str]]:
        """The JSON answer and its headers; an error answer raises its code and message."""
        req = self._request(method, path, body, raw)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                text = r.read()
                return (json.loads(text) if text else None), dict(r.headers.items())
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                err = json.loads(text)["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                raise BackendError(f"{method} {path}: HTTP {e.code}: {text[:200]!r}") from None
            raise error_from(code, message) from None
        except urllib.error.URLError as e:
            raise BackendError(f"cannot reach {self.base}: {e.reason}") from None

    def json(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None) -> Any:
        return self.call(method, path, body, raw)[0]


class SseFollower(threading.Thread):
    """Reads the server's SSE stream of one upgrade (``id: seq``; resumes after ``since``) and
    hands each event to ``on_event`` until stopped."""

    def __init__(self, http: Http, upgrade_id: str, since: int, on_event):
        super().__init__(daemon=True, name=f"eua-sse-{upgrade_id}")
        self._http = http
        self._path = f"/api/v1/upgrades/{q(upgrade_id)}/events/stream"
        self._since = since
        self._on_event = on_event
        self._stop = threading.Event()
        self._resp = None

    def _events(self) -> Iterator[Dict[str, Any]]:
        req = self._http._request("GET", self._path, headers={
            "Accept": "text/event-stream", "Last-Event-ID": str(self._since)})
        self._resp = urllib.request.urlopen(req, timeout=None)
        data = []
        for raw in self._resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif line == "" and data:
                text, data = "\n".join(data), []
                try:
                    yield json.loads(text)
                except ValueError:
                    continue

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                for v in self._events():
                    if self._stop.is_set():
                        return
                    e = v.get("data", v) if isinstance(v, dict) and "type" in v else v
                    if isinstance(e, dict) and "seq" in e and "event_id" in e:
                        self._since = max(self._since, int(e["seq"]))
                        try:
                            self._on_event(e)
                        except Exception:  # noqa: BLE001
                            pass
            except Exception:  # noqa: BLE001 - reconnect after a drop
                if self._stop.wait(0.5):
                    return

    def stop(self) -> None:
        self._stop.set()
        r = self._resp
        if r is not None:
            try:
                r.close()
            except Exception:  # noqa: BLE001
                pass
