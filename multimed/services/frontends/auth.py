"""Who may call: bearer tokens, named one per client system (`tokens.py`), checked by the guard
(`guard.py`) on every method but the probes. The token file is read again when it changes, so a
token can be added or revoked without a restart."""

from __future__ import annotations

import contextlib
import hmac
import os
import time
from pathlib import Path

from multimed.services.tokens import TOKEN_ENV, parse_tokens

RECHECK_S = 1.0  # how often the token file's modification time is looked at


class Tokens:
    """The accepted tokens; empty when neither a file nor the environment names any (no auth)."""

    def __init__(self, path: str | None = None, env: dict[str, str] | None = None):
        self.path = Path(path) if path else None
        env = os.environ if env is None else env
        self.from_env = {env[TOKEN_ENV]: "env"} if env.get(TOKEN_ENV) else {}
        self.file: dict[str, str] = {}
        self.stamp: int | None = None
        self.checked = 0.0
        self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        stamp = self.path.stat().st_mtime_ns
        if stamp != self.stamp:
            self.file = parse_tokens(self.path.read_text(), str(self.path))
            self.stamp = stamp

    @property
    def enabled(self) -> bool:
        return self.path is not None or bool(self.from_env)

    def name_of(self, bearer: str) -> str | None:
        """The name of the token in an `authorization` value, or None."""
        now = time.monotonic()
        if now - self.checked > RECHECK_S:
            self.checked = now
            # A file being rewritten can be unreadable for a moment: keep the last good tokens.
            with contextlib.suppress(OSError, ValueError):
                self._reload()
        if not bearer.startswith("Bearer "):
            return None
        sent = bearer.removeprefix("Bearer ").encode()
        found = None
        for token, name in (*self.file.items(), *self.from_env.items()):
            if hmac.compare_digest(sent, token.encode()):
                found = name  # no early exit: the time taken does not tell which matched
        return found
