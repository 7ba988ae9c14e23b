"""Token buckets per sender: the rate limits of the trainer socket and of the peer control channel."""

from __future__ import annotations

import collections
import time
from collections.abc import Hashable


class TokenBuckets:
    """``rate`` requests/s per sender, in bursts of twice that; the least recently heard of more than
    ``max_senders`` senders is forgotten (it starts again with a full bucket)."""

    def __init__(self, rate: float, max_senders: int = 4096) -> None:
        self.rate, self.burst, self.max_senders = rate, 2 * rate, max_senders
        self._b: collections.OrderedDict[Hashable, list[float]] = collections.OrderedDict()

    def allow(self, sender: Hashable) -> bool:
        now = time.monotonic()
        b = self._b.get(sender)
        if b is None:
            b = self._b[sender] = [self.burst, now]
            if len(self._b) > self.max_senders:
                self._b.popitem(last=False)
        else:
            self._b.move_to_end(sender)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] < 1.0:
            return False
        b[0] -= 1.0
        return True
