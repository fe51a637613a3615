"""The SDK's weight, and what it reads: tokens and TLS settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from multimed.client.channel import ChannelSettings
from multimed.services.tokens import TOKEN_ENV, client_token, parse_tokens


def test_client_imports_neither_torch_nor_ray_and_loads_fast():
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "from multimed.client import AsyncMultiMedClient, MultiMedClient\n"
        "took = time.perf_counter() - t\n"
        "loaded = {'torch': 'torch' in sys.modules, 'ray': 'ray' in sys.modules}\n"
        "print(json.dumps({'s': took, **loaded}))\n"
    )
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(3)
    ]
    assert not any(r["torch"] or r["ray"] for r in runs), runs
    # ~0.3 s here; torch alone takes seconds. Generous: a busy machine slows any import.
    assert min(r["s"] for r in runs) < 3.0, runs


def test_token_file_names_each_client_system(tmp_path, monkeypatch):
    text = "# one line per client system\nradiology  tok-A\n\ntok-B\n"
    assert parse_tokens(text, "tokens") == {"tok-A": "radiology", "tok-B": "default"}
    with pytest.raises(ValueError, match="line 1"):
        parse_tokens("a b c", "tokens")
    with pytest.raises(ValueError, match="listed twice"):
        parse_tokens("x tok\ny tok", "tokens")
    path = tmp_path / "tokens"
    path.write_text(text)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert client_token(path) == "tok-A"
    assert client_token() == "from-env"


def test_server_tokens_reload_when_the_file_changes(tmp_path, monkeypatch):
    from multimed.services.frontends import auth

    path = tmp_path / "tokens"
    path.write_text("pacs old-token\n")
    tokens = auth.Tokens(str(path), env={TOKEN_ENV: "env-token"})
    assert tokens.name_of("Bearer old-token") == "pacs"
    assert tokens.name_of("Bearer env-token") == "env"
    assert tokens.name_of("old-token") is None  # not a bearer value
    path.write_text("ris new-token\n")
    monkeypatch.setattr(auth, "RECHECK_S", 0.0)
    import os

    os.utime(path, ns=(1, 10**18))  # a distinct modification time
    assert tokens.name_of("Bearer new-token") == "ris"
    assert tokens.name_of("Bearer old-token") is None


def test_channel_settings():
    assert not ChannelSettings().secure
    assert ChannelSettings(tls=True).secure and ChannelSettings(tls_ca="ca.pem").secure
    with pytest.raises(ValueError, match="needs its key"):
        ChannelSettings(tls_cert="client.pem")
    assert ChannelSettings(token="t").metadata() == (("authorization", "Bearer t"),)
