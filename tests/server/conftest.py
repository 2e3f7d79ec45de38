"""The real server as users run it: `valora serve` in a subprocess (uvicorn on 127.0.0.1, a free port), driven
over HTTP. One tiny Qwen2-VL and eight PEFT adapters of different ranks and targets serve every module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.process import ServerProcess
from valora.testing.checkpoints import peft_target_regex
from valora.testing.families import LM_LINEARS

# (rank, PEFT targets): LM attention only, the whole LM, and the vision tower plus the LM.
ADAPTER_SPECS = [
    (2, peft_target_regex(["q_proj", "v_proj"])),
    (4, peft_target_regex(LM_LINEARS)),
    (8, peft_target_regex(["q_proj", "k_proj", "v_proj", "o_proj"])),
    (16, peft_target_regex(["gate_proj", "up_proj", "down_proj"])),
    (4, r".*(visual.*\.(qkv|fc1)|language_model.*\.(q_proj|v_proj))$"),
    (8, peft_target_regex(LM_LINEARS)),
    (6, peft_target_regex(["o_proj", "down_proj"])),
    (12, peft_target_regex(["q_proj", "v_proj"])),
]


@pytest.fixture(scope="session")
def server_model(model_factory) -> Path:
    return model_factory("qwen2_vl", initializer_range=0.05)


@pytest.fixture(scope="session")
def adapters(server_model, adapter_factory) -> dict[str, Path]:
    return {f"lora{i}": adapter_factory(server_model, r=r, target_modules=t, seed=100 + i)
            for i, (r, t) in enumerate(ADAPTER_SPECS)}


@pytest.fixture(scope="module")
def start_server(server_model, tmp_path_factory) -> Iterator:
    """Start `valora serve` with extra args; every server started is stopped at the end of the module."""
    started: list[ServerProcess] = []

    def start(args: list[str], api_key: str | None = None) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(server_model, args, log, api_key)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
