"""One JSON request to an expert server, bounded against a server that is slow, broken or hostile.

A server is outside the trainer's control, so every way a reply can stall or swamp the run has a bound of its own:
  - `timeout_s` bounds one try as a whole (connect, send, headers and body): a watchdog shuts the socket down when
    it passes, so a server that drips a byte at a time (each read within a per-read timeout) cannot hold the run;
  - `deadline_s` bounds the request with all its tries and waits; a wait that would pass it ends the request now;
  - `max_bytes` caps the reply (announced or counted as it arrives): it is read into memory and parsed whole;
  - HTTP 429 and 5xx, resets, a body cut short of its Content-Length and a try past `timeout_s` are retried, up to
    `max_retries` times, after `Retry-After` when the server sends one (seconds or an HTTP date), else after
    `backoff_s * 2**k`;
  - redirects are refused, not followed: a request re-sent to another address is not what the config names;
  - every failure is one line (`ExpertError`) naming the server and the cause.
"""

from __future__ import annotations

import dataclasses
import email.utils
import http.client
import json
import socket
import threading
import time
import urllib.parse

from distil_jax.errors import ExpertError


@dataclasses.dataclass(frozen=True)
class Policy:
  timeout_s: float = 30.0  # one try, whole
  deadline_s: float = 180.0  # one request, every try and wait included
  max_retries: int = 3
  backoff_s: float = 0.5
  max_bytes: int = 64 << 20  # one reply

  @classmethod
  def from_config(cls, cfg) -> Policy:
    """From the config's `expert` section (timeout_s, deadline_s, max_retries, backoff_s, max_reply_mb)."""
    return cls(
      timeout_s=float(cfg.timeout_s),
      deadline_s=float(cfg.deadline_s),
      max_retries=int(cfg.max_retries),
      backoff_s=float(cfg.backoff_s),
      max_bytes=int(float(cfg.max_reply_mb) * (1 << 20)),
    )


class _Retry(Exception):
  """A failure of one try that another try may not repeat; `wait` is the server's Retry-After, if any."""

  def __init__(self, why: str, wait: float | None = None):
    super().__init__(why)
    self.wait = wait


def retry_after(value: str | None, now: float | None = None) -> float | None:
  """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
  if not value:
    return None
  value = value.strip()
  if value.isdigit():
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  if when is None or when.tzinfo is None:
    return None
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


def post_json(url: str, payload, policy: Policy):
  """POST `payload` as JSON to `url` and return the parsed JSON reply, within `policy`'s bounds."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https") or not parts.hostname:
    raise ExpertError(f"expert {url}: not an http:// or https:// address")
  body = json.dumps(payload).encode()
  end = time.monotonic() + policy.deadline_s
  last, wait = None, None
  for attempt in range(policy.max_retries + 1):
    if attempt:
      pause = wait if wait is not None else policy.backoff_s * 2 ** (attempt - 1)
      if time.monotonic() + pause >= end:
        raise ExpertError(
          f"expert {url}: {last}; a retry after {pause:.1f} s would pass expert.deadline_s={policy.deadline_s:g}"
        )
      time.sleep(pause)
    limit = min(policy.timeout_s, end - time.monotonic())
    if limit <= 0:
      raise ExpertError(f"expert {url}: no answer within expert.deadline_s={policy.deadline_s:g} ({last})")
    try:
      status, headers, raw = _exchange(parts, body, limit, policy.max_bytes, url)
    except _Retry as e:
      last, wait = str(e), e.wait
      continue
    if 300 <= status < 400:
      where = headers.get("Location", "nowhere")
      raise ExpertError(
        f"expert {url}: HTTP {status} redirects to {where!r}; redirects are not followed: set expert.url to the "
        "server's own address"
      )
    if status == 429 or status >= 500:
      last, wait = f"HTTP {status}", retry_after(headers.get("Retry-After"))
      continue
    if status != 200:
      raise ExpertError(f"expert {url}: HTTP {status}: {raw[:200]!r}")
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      why = getattr(e, "msg", None) or type(e).__name__
      raise ExpertError(f"expert {url}: reply is not valid JSON ({why}): {raw[:200]!r}") from None
  raise ExpertError(f"expert {url}: no answer after {attempt + 1} tries ({last})")


def _exchange(parts, body: bytes, limit: float, max_bytes: int, url: str):
  """(status, headers, body) of one try, all of it within `limit` seconds; _Retry for what another try may fix."""
  cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
  conn = cls(parts.hostname, parts.port, timeout=limit)
  expired = threading.Event()

  def expire():  # wakes any blocked connect, send or recv of this try
    expired.set()
    sock = conn.sock
    if sock is not None:
      try:
        sock.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  start = time.monotonic()
  watchdog = threading.Timer(limit, expire)
  watchdog.daemon = True
  watchdog.start()
  slow = f"no complete reply within {limit:g} s, connect to last byte (expert.timeout_s)"
  try:
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn.request("POST", path, body, {"Content-Type": "application/json", "Content-Length": str(len(body))})
    resp = conn.getresponse()
    announced = resp.getheader("Content-Length")
    if announced and announced.strip().isdigit() and int(announced) > max_bytes:
      raise ExpertError(
        f"expert {url}: reply of {int(announced)} bytes is over expert.max_reply_mb ({max_bytes} bytes)"
      )
    chunks, size = [], 0
    while True:
      if expired.is_set() or time.monotonic() - start > limit:
        raise _Retry(slow)
      data = resp.read1(1 << 16)
      if not data:
        break
      size += len(data)
      if size > max_bytes:
        raise ExpertError(f"expert {url}: reply over expert.max_reply_mb ({max_bytes} bytes) and still coming")
      chunks.append(data)
    if expired.is_set():
      raise _Retry(slow)
    if resp.length:  # the connection ended before the Content-Length did
      raise _Retry(f"reply cut after {size} of {size + resp.length} bytes")
    return resp.status, resp.headers, b"".join(chunks)
  except (OSError, http.client.HTTPException) as e:
    if expired.is_set():
      raise _Retry(slow) from None
    if isinstance(e, http.client.IncompleteRead):
      raise _Retry(f"reply cut after {len(e.partial)} bytes") from None
    raise _Retry(f"{type(e).__name__}: {e}") from None
  finally:
    watchdog.cancel()
    conn.close()
