"""Is the peer of a WebSocket alive?  The rule, as a plain object with ``now`` passed in.

WebSocket keepalive as websockets does it (send a ping, fail if its pong is not
back within ``ping_timeout``) kills slow but healthy peers: once a side stops
reading because its own consumer is slow, flow control holds back everything
behind the data, pings and pongs included, and the timeout fires on a peer that
is alive.  TCP keeps such a connection forever (the kernel answers zero-window
probes) and still notices a dead one.  devstreams does the same in two layers:

* **Heartbeats, judged only while we listen.**  Each side sends a frame at
  least every ``interval``: any frame it writes counts, and only a side that
  wrote nothing for ``interval`` sends a heartbeat (a ping if none is
  outstanding, else an unsolicited pong, RFC 6455 5.5.3).  A stream with data
  flowing both ways every few seconds carries no heartbeats at all (issue 10:
  at 5,000 streams they were 4,000 frames a second through the gateway).  A peer is lost when nothing at all has arrived from
  it for ``interval + timeout`` *of the time we were reading*: while our own
  reading is paused (we hold back because our consumer is slow) silence is not
  the peer's fault, so it does not count.  A flow-controlled peer still writes
  its heartbeats to us, so it always passes; a crashed or frozen (SIGSTOP) one
  falls silent and is cut within the bound.
* **The kernel, while we cannot listen.**  TCP keepalive on the socket
  (``devstreams.transport.wslink``) ends an idle connection whose host stopped answering, even
  while reading is paused.  ``TCP_USER_TIMEOUT`` is deliberately *not* set:
  measured on Linux 6.18, it aborts a connection whose live peer keeps
  answering zero-window probes (a paused reader) after the timeout, which is
  the very bug this module fixes; plain keepalive keeps that connection.

A frozen process whose kernel still acknowledges, on a connection we are not
reading because the other side of the stream is slow, is kept, exactly as TCP
keeps it.
"""


class Liveness:
    """``interval``: send a heartbeat at least this often; ``timeout``: extra silence tolerated."""

    def __init__(self, interval: float, timeout: float, now: float):
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be greater than 0")
        self.interval, self.timeout = interval, timeout
        self._heard = self._sent = now
        self._paused = False

    @property
    def limit(self) -> float:
        """Longest silence (while listening) before the peer counts as lost."""
        return self.interval + self.timeout

    # -- what happened ---------------------------------------------------------------------------

    def heard(self, now: float) -> None:
        """Some bytes arrived from the peer."""
        self._heard = now

    def sent(self, now: float) -> None:
        """We wrote a frame to the peer (data, a close, or a heartbeat)."""
        self._sent = now

    def pause(self, now: float) -> None:
        """We stopped reading (our consumer is slow): silence from now on is not the peer's."""
        self._paused = True

    def resume(self, now: float) -> None:
        """We read again: the silence clock restarts now."""
        if self._paused:
            self._paused = False
            self._heard = max(self._heard, now)

    # -- what to do ------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def heartbeat_due(self, now: float) -> bool:
        return now - self._sent >= self.interval

    def lost(self, now: float) -> bool:
        """True when the peer has been silent for longer than the limit while we listened."""
        return not self._paused and now - self._heard > self.limit

    def next_check(self, now: float) -> float:
        """When to look again: the next heartbeat or the moment silence would reach the limit."""
        due = self._sent + self.interval
        if not self._paused:
            due = min(due, self._heard + self.limit + 0.001)
        return max(due, now)
