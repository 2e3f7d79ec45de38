"""Acceptance 2 of issue 23: schemathesis, every check (`--checks all`), against the server's own /openapi.json:
over 1,000 generated requests (valid and invalid bodies, wrong methods, missing keys) get no server error and no
response that differs from the schema (status, content type, headers, body, SSE events). Deterministic
generation, so a failure reproduces; a short context keeps the generations that do run quick."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

KEY = "fuzz-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_openapi_fuzzing_finds_no_server_error_and_no_schema_mismatch(start_server, tmp_path):
    (tmp_path / "adapters").mkdir()
    server = start_server(["--max-model-len", "64", "--num-kv-blocks", "256", "--max-num-seqs", "16",
                           "--lora-root", str(tmp_path / "adapters")], api_key=KEY)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
           "--checks", "all", "--header", f"Authorization: Bearer {KEY}", "--max-examples", "100",
           "--generation-deterministic", "--workers", "1", "--request-timeout", "120",
           "--continue-on-failure", "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    summary = run.stdout[-3000:]
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", summary).groups())
    assert generated == passed and generated >= 1000, summary
    assert "Traceback" not in server.log_text()
