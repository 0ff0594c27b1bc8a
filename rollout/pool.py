"""Health of a fleet of rollout servers: which may generate, which must be brought up to date first.

    pool = ServerPool(urls, probe_interval_s=2.0)   # a daemon thread probes the servers that are out
    url = pool.pick()                               # round-robin over live servers (None: none is live)
    pool.mark_out(url, "ConnectError: ...")         # a failed request, push or stale answer
    for url in pool.suspects(): push weights to it, then pool.resynced(url, version)
    pool.wait_for_recovery(min_live, timeout_s)     # or PoolExhausted naming every server's last error

States:
- live: serves /generate and receives every push;
- out: a request, a push or a stale answer failed on it; its reason is logged once per outage;
- suspect: answers /health again, but may hold old weights (a restarted server comes up with the
  checkpoint it was started from). It receives pushes but no /generate until the trainer pushed it the
  current weights and it reported that `weight_version` (`resynced`): a push is a collective step of all
  trainer ranks, so only the trainer, never the probe, moves a server from suspect to live.

`version` is the label of the weights the trainer pushed last ("" before the first push: servers report
"default" then); the client refuses a response of any other version (`is_current`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

LIVE, SUSPECT, OUT = "live", "suspect", "out"


class PoolExhausted(RuntimeError):
    """Fewer live rollout servers than required, for longer than the recovery timeout."""


@dataclass
class ServerState:
    state: str = LIVE
    last_error: str = ""
    failures: int = 0


class ServerPool:
    """Thread-safe: the client's worker threads, the trainer and the probe thread all use it."""

    def __init__(self, urls: list[str], probe_interval_s: float = 2.0, headers: dict[str, str] | None = None) -> None:
        if not urls:
            raise ValueError("rollout.urls: need at least one server")
        self.urls = [u.rstrip("/") for u in urls]
        self._states = {u: ServerState() for u in self.urls}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._next = 0
        self.failures = 0  # mark_out calls that took a server out (metric rollout/server_failures)
        self.resyncs = 0  # suspects brought up to date (metric rollout/resyncs)
        self.version = ""  # label of the current weights; "" = none pushed yet
        self._stop = threading.Event()
        self._probe_interval_s = probe_interval_s
        self._headers = headers or {}
        self._thread = threading.Thread(target=self._probe_loop, daemon=True, name="rollout-pool-probe")
        self._thread.start()

    # ------------------------------------------------------------------------------------------ queries
    def pick(self) -> str | None:
        """The next live server (round-robin), or None when none is live."""
        with self._lock:
            for _ in range(len(self.urls)):
                url = self.urls[self._next % len(self.urls)]
                self._next += 1
                if self._states[url].state == LIVE:
                    return url
        return None

    def state(self, url: str) -> str:
        with self._lock:
            return self._states[url].state

    def live(self) -> list[str]:
        return self._in(LIVE)

    def suspects(self) -> list[str]:
        return self._in(SUSPECT)

    def targets(self) -> list[str]:
        """The servers a weight push goes to: live and suspect ones (an out server is unreachable)."""
        return self._in(LIVE, SUSPECT)

    def is_current(self, weight_version: object) -> bool:
        """Whether a response labelled `weight_version` came from the current weights."""
        if not self.version:
            return weight_version in (None, "", "default")
        return weight_version is not None and str(weight_version) == self.version

    def describe(self) -> str:
        """Every server with its state and last error (for the message that stops a run)."""
        with self._lock:
            return self._describe_locked()

    def metrics(self) -> dict[str, float]:
        with self._lock:
            live = sum(s.state == LIVE for s in self._states.values())
            return {"rollout/live_servers": float(live), "rollout/server_failures": float(self.failures),
                    "rollout/resyncs": float(self.resyncs)}

    # ------------------------------------------------------------------------------------------ changes
    def mark_out(self, url: str, reason: str) -> None:
        with self._changed:
            entry = self._states[url]
            entry.last_error = reason
            if entry.state != OUT:  # logged (and counted) once per outage
                entry.failures += 1
                self.failures += 1
                log.warning("rollout server %s is out: %s", url, reason)
            entry.state = OUT
            self._changed.notify_all()

    def mark_suspect(self, url: str, why: str) -> None:
        """The server is back (its supervisor restarted it, or it answers /health): re-sync it first."""
        with self._changed:
            if self._states[url].state != SUSPECT:
                log.info("rollout server %s %s: it gets the current weights before any /generate", url, why)
            self._states[url].state = SUSPECT
            self._changed.notify_all()

    def resynced(self, url: str, reported_version: object) -> bool:
        """After a push to `url`: it is live if it reports the current version, out otherwise."""
        if not self.is_current(reported_version):
            self.mark_out(url, f"reports weight_version {reported_version!r} after the push of {self.version!r}")
            return False
        with self._changed:
            entry = self._states[url]
            if entry.state == SUSPECT:
                self.resyncs += 1
                log.info("rollout server %s is live again at weight_version %s", url, self.version)
            entry.state = LIVE
            self._changed.notify_all()
        return True

    def wait_for(self, min_live: int, timeout_s: float, *, until_suspect: bool = True,
                 configured_timeout_s: float | None = None) -> str:
        """Block until at least `min_live` servers are live ("live"), or (with `until_suspect`) some server
        is suspect, i.e. needs the trainer's push ("suspect"). After `timeout_s`: PoolExhausted naming every
        server and its last error (the message names `configured_timeout_s`, the setting, if given)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                states = [s.state for s in self._states.values()]
                if until_suspect and SUSPECT in states:
                    return SUSPECT
                if states.count(LIVE) >= min_live:
                    return LIVE
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolExhausted(
                        f"{states.count(LIVE)} of {len(self.urls)} rollout servers live, rollout.min_live_servers="
                        f"{min_live}, none recovered within rollout.recovery_timeout_s={configured_timeout_s or timeout_s:g}: "
                        f"{self._describe_locked()}")
                self._changed.wait(min(left, 1.0))

    def probe_all(self) -> None:
        """Once, before the first request: a server that does not answer /health starts out."""
        with httpx.Client(headers=self._headers, timeout=5.0) as http:
            for url in self.urls:
                try:
                    status = http.get(url + "/health").status_code
                    reason = "" if status == 200 else f"/health answered HTTP {status}"
                except httpx.HTTPError as exc:
                    reason = f"/health: {exc!r}"
                if reason:
                    self.mark_out(url, reason)

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------------------------------ inside
    def _in(self, *states: str) -> list[str]:
        with self._lock:
            return [u for u in self.urls if self._states[u].state in states]

    def _describe_locked(self) -> str:
        return "; ".join(f"{u} {s.state}" + (f" (last error: {s.last_error})" if s.last_error else "")
                         for u, s in self._states.items())

    def _probe_loop(self) -> None:
        with httpx.Client(headers=self._headers, timeout=5.0) as http:
            while not self._stop.wait(self._probe_interval_s):
                for url in self._in(OUT):
                    try:
                        healthy = http.get(url + "/health").status_code == 200
                    except httpx.HTTPError:
                        healthy = False
                    if healthy and self.state(url) == OUT:
                        self.mark_suspect(url, "answers /health again")
