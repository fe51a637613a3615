"""Bearer tokens, named one per client system, from a token file or the `MULTIMED_TOKEN`
environment variable: never from the Serve config, the app's arguments or a command line.

Token file: one token per line, `NAME TOKEN` (NAME is what the audit log calls that client) or a
bare `TOKEN` (named "default"); blank lines and lines starting with # are skipped. Imports
neither torch nor ray: the SDK reads tokens with it too."""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_ENV = "MULTIMED_TOKEN"


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """-> token -> name."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) > 2:
            raise ValueError(f"{source} line {number}: expected 'NAME TOKEN' or 'TOKEN'")
        name, token = parts if len(parts) == 2 else ("default", parts[0])
        if token in tokens:
            raise ValueError(f"{source} line {number}: a token is listed twice")
        tokens[token] = name
    return tokens


def client_token(token_file: str | Path | None = None) -> str | None:
    """The token a client sends: the file's first, else MULTIMED_TOKEN, else none."""
    if token_file is not None:
        tokens = parse_tokens(Path(token_file).read_text(), str(token_file))
        if not tokens:
            raise ValueError(f"token file {token_file} holds no token")
        return next(iter(tokens))
    return os.environ.get(TOKEN_ENV) or None
