"""One warning line per kind of refusal and then at most one every `every_s`, with how many were left out.

A refused peer may retry every half second (a claim, a subscription): the control and events sockets log the
first refusal of each (key, reason, what) at once, then one line per window saying how many more came, so a
flood of refusals never becomes a flood of log lines. The table of kinds is bounded whatever keys are tried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable


class KeyedLog:
    """`warning(kind, message)`: logged the first time and then once per `every_s` for each `kind`."""

    def __init__(self, logger: logging.Logger, prefix: str, every_s: float, max_kinds: int) -> None:
        self.logger = logger
        self.prefix = prefix
        self.every_s = every_s
        self.max_kinds = max_kinds
        self._logged: dict[Hashable, tuple[float, int]] = {}  # kind -> (last logged, left out since)

    def warning(self, kind: Hashable, message: str) -> None:
        now = time.monotonic()
        last, since = self._logged.get(kind, (-self.every_s, 0))
        if now - last >= self.every_s:
            if len(self._logged) >= self.max_kinds:
                self._logged.clear()
            self._logged[kind] = (now, 0)
            self.logger.warning(
                "%s: %s%s", self.prefix, message, f" ({since} more since the last such line)" if since else ""
            )
        else:
            self._logged[kind] = (last, since + 1)
