"""Acceptance 5: `valora serve --help` and the README's Serving section name every flag and every endpoint."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from valora.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _serve_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["serve"]


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_every_flag_is_documented_in_help_and_readme():
    parser = _serve_parser()
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert len(flags) >= 30
    help_text = parser.format_help()
    serving = _section(README.read_text(), "Serving")
    for flag in flags:
        assert flag in help_text, flag
        assert re.search(rf"`{re.escape(flag)}[ `]", serving), f"{flag} is missing from the README's Serving section"


def test_every_endpoint_is_documented_in_help_and_readme(server_model):
    from valora.config import EngineConfig
    from valora.engine.core_host import CoreInfo
    from valora.server.app import ServerConfig, build_app

    # the routes exist before the app connects to an engine core: none needs to run for the schema
    app = build_app(EngineConfig(model=str(server_model)), "ipc://unused", CoreInfo(64, None, ()),
                    ServerConfig(served_model_names=["m"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warned of /ping's GET and POST sharing one operation id
        paths = app.openapi()["paths"]
    endpoints = {f"{method.upper()} {path}" for path, ops in paths.items() for method in ops}
    assert len(endpoints) == 13
    ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(set(ids)) == len(ids) and {paths["/ping"]["get"]["operationId"], paths["/ping"]["post"][
        "operationId"]} == {"ping_ping_get", "ping_ping_post"}
    help_text = " ".join(_serve_parser().format_help().split())
    serving = _section(README.read_text(), "Serving")
    for endpoint in endpoints:
        method, path = endpoint.split()
        assert re.search(rf"{method}\s+{re.escape(path)}\b", help_text), endpoint
        assert f"`{method} {path}`" in serving, endpoint
    assert "curl http" in serving and "openai.OpenAI(" in serving
