"""Settings that change without a restart: on SIGHUP, or when a watched file changes (the config file, and files
the settings name such as the router's auth file), the settings are loaded again. A bad new file is refused and
logged, and the old settings stay; a good one is applied by the process's own callback, which gets the old and
the new settings. Settings not marked reloadable that changed are logged as needing a restart."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from trellis_settings.fields import extra
from trellis_settings.layers import Loaded, SettingsError, flat, leaves
from trellis_settings.parser import Configured

log = structlog.get_logger("trellis.settings")


def _mtimes(paths: list[Path]) -> tuple:
    out = []
    for path in paths:
        try:
            stat = path.stat()
            out.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class Reloader:
    def __init__(self, configured: Configured, apply: Callable[[Loaded, Loaded], Awaitable[None]],
                 watched: Callable[[Loaded], list[Path]] = lambda loaded: [], poll_s: float = 2.0,
                 check: Callable[[Loaded], None] = lambda loaded: None) -> None:
        """apply(old, new) puts the new settings to work; watched(settings) names files to watch besides the
        config file; check(new) may raise SettingsError to refuse settings the model cannot judge alone (a
        file they name that does not parse)."""
        self.configured = configured
        self.current = configured.loaded
        self.apply = apply
        self.watched = watched
        self.check = check
        self.poll_s = poll_s
        self.reloads = 0
        self.refusals = 0
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def _paths(self) -> list[Path]:
        return ([self.current.config] if self.current.config else []) + list(self.watched(self.current))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload("SIGHUP")))
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        seen = _mtimes(self._paths())
        while True:
            await asyncio.sleep(self.poll_s)
            now = _mtimes(self._paths())
            if now != seen:
                seen = now
                await self.reload("file changed")
                seen = _mtimes(self._paths())

    async def reload(self, why: str) -> bool:
        async with self._lock:
            old = self.current
            try:
                new = self.configured.reload()
                self.check(new)
            except SettingsError as err:
                self.refusals += 1
                log.warning("settings reload refused; the old settings stay", why=why, error=str(err))
                return False
            before, after = flat(old.settings), flat(new.settings)
            changed = sorted(k for k in after if after[k] != before[k])
            infos = {".".join(p): i for p, i in leaves(type(new.settings)).items()}
            restart = [k for k in changed if not extra(infos[k]).get("reload")]
            await self.apply(old, new)
            self.current = new
            self.reloads += 1
            log.info("settings reloaded", why=why, changed={k: after[k] for k in changed if k not in restart},
                     needs_restart=restart)
            return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
