"""The local stand-in for Cloud Scheduler: publishes a tick to ``reconcile-ticks`` every ``tick_s`` seconds."""

from __future__ import annotations

import logging
import time

from embedpipe import logs, topology
from embedpipe.config import Settings
from embedpipe.contracts.events import TICK, Event
from embedpipe.gcp import bus

log = logging.getLogger(__name__)


def main() -> None:
    logs.setup(fmt=Settings.from_env().log_format)
    settings = Settings.from_env()
    while True:
        try:
            bus.publish(settings.project, topology.RECONCILE_TICKS, Event(TICK, {}), timeout=10)
        except Exception as exc:  # noqa: BLE001 - a missed tick only delays; keep ticking
            log.warning("tick not published: %s", exc)
        time.sleep(settings.tick_s)


if __name__ == "__main__":
    main()
