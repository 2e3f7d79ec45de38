"""The system under test: a model with adapters (built with `valora.testing` when missing) and `valora serve`
in a subprocess, started once per scheduler exactly as a user would start it."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from valora.errors import UserError
from valora.testing.families import LM_LINEARS

logger = logging.getLogger("valora.bench")
SERVED_NAME = "base"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterSpec:
    """`count` random PEFT adapters; adapter i has rank `ranks[i % len(ranks)]` and targets the LM's `targets`.
    Adapter order is popularity order under Zipf and `hot` skews (adapter 0 is the hottest).

    `distinct` weight files are drawn (default: one per adapter); adapter i >= distinct is a directory of its own
    (its own `adapter_config.json`, so the server loads and counts it as any other) whose weights file is a link
    to adapter i % distinct's: 1,000 adapters of a 7B model cost the disk and build time of a few."""

    count: int = 16
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    targets: tuple[str, ...] = LM_LINEARS
    dir: Path | None = None  # default: next to the model, "<model>-adapters" (a named set: "-adapters-<name>")
    dtype: str = "bfloat16"
    device: str = "cpu"  # where the random weights are drawn (cuda is faster for 7B shapes)
    distinct: int | None = None

    def __post_init__(self) -> None:
        if self.distinct is not None and (self.distinct < 1 or self.distinct % len(self.ranks)):
            raise ValueError(f"adapters.distinct ({self.distinct}) must be a positive multiple of the number of "
                             f"ranks ({len(self.ranks)}), so that shared weights keep each adapter's rank")

    @property
    def names(self) -> list[str]:
        """lora00, lora01, ... with as many digits as the largest index needs, so names sort in order."""
        width = max(2, len(str(self.count - 1)))
        return [f"lora{i:0{width}d}" for i in range(self.count)]


@dataclass(frozen=True)
class ModelSpec:
    """A model directory; `build` (the keyword arguments of `valora.testing.checkpoints.build_model`, with
    `family`, and `dtype` as a name) makes a random checkpoint there when it does not exist yet."""

    path: Path
    build: dict | None = None
    adapters: AdapterSpec = field(default_factory=AdapterSpec)

    def adapter_dir(self, spec: AdapterSpec, name: str | None = None) -> Path:
        suffix = "-adapters" + (f"-{name}" if name else "")
        return spec.dir or self.path.with_name(self.path.name + suffix)

    def prepare(self, spec: AdapterSpec | None = None, name: str | None = None) -> dict[str, Path]:
        """Build whatever is missing of the model and of the adapter set `spec` (default: `adapters`; `name`
        places another set beside it) and return the set's adapters by name. A build on the GPU runs in a child
        process, so that none of the memory it used stays held here while the server sizes its KV cache."""
        spec = spec or self.adapters
        root = self.adapter_dir(spec, name)
        adapters = {n: root / n for n in spec.names}
        missing = [p for p in adapters.values() if not (p / "adapter_config.json").exists()]
        if (self.path / "config.json").exists() and not missing:
            return adapters
        devices = {(self.build or {}).get("device", "cpu"), spec.device}
        if any(d.startswith("cuda") for d in devices):
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                pool.submit(self._build, spec, adapters).result()
        else:
            self._build(spec, adapters)
        return adapters

    def _build(self, spec: AdapterSpec, adapters: dict[str, Path]) -> None:
        import torch

        from valora.testing.checkpoints import build_model, peft_target_regex, save_random_adapter

        if not (self.path / "config.json").exists():
            if self.build is None:
                raise FileNotFoundError(f"{self.path} is not a model directory and the config has no `build`")
            kw = dict(self.build)
            family = kw.pop("family")
            kw["dtype"] = getattr(torch, kw.get("dtype", "float32"))
            t = time.perf_counter()
            build_model(family, self.path, **kw)
            logger.info("built %s checkpoint in %s (%.0f s)", family, self.path, time.perf_counter() - t)
        paths = list(adapters.values())
        distinct = spec.distinct or len(paths)
        t = time.perf_counter()
        for i, path in enumerate(paths):
            if (path / "adapter_config.json").exists():
                continue
            if i < distinct:
                save_random_adapter(self.path, path, r=spec.ranks[i % len(spec.ranks)], seed=1000 + i,
                                    target_modules=peft_target_regex(spec.targets), dtype=getattr(torch, spec.dtype),
                                    device=spec.device)
                continue
            source = paths[i % distinct]
            path.mkdir(parents=True, exist_ok=True)
            link = path / WEIGHTS
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(source / WEIGHTS, path))
            shutil.copyfile(source / "adapter_config.json", path / "adapter_config.json")  # last: marks it built
        logger.info("built %d adapters (%d weight files) in %s (%.0f s)", len(paths), min(distinct, len(paths)),
                    paths[0].parent, time.perf_counter() - t)


class ServeProcess:
    """`valora serve MODEL ARGS...` in a subprocess on a free local port, as users run it, its output in `log_path`.
    `start()` (or `with`) returns the base URL once `/health` answers; `stop()` ends it (and may be called again)."""

    def __init__(self, model: Path, args: list[str], log_path: Path, startup_timeout_s: float = 120.0,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        """`env` adds to (or overrides) this process's environment; `cwd` (default: ours) is where it runs, which
        decides the `valora` it imports when PYTHONPATH points at another checkout (`-m` puts cwd first)."""
        from valora.server.launch import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "valora.cli", "serve", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.log_path, self.startup_timeout_s = log_path, startup_timeout_s
        self.env, self.cwd = env or {}, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        env = {k: v for k, v in os.environ.items() if k != "VALORA_API_KEY"} | self.env
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"`{' '.join(self.cmd)}` exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server was not ready after {self.startup_timeout_s} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ServeProcess):
    """`valora serve MODEL --scheduler S` with the sweep's adapters, served under SERVED_NAME."""

    def __init__(self, model: Path, adapters: dict[str, Path], scheduler: str, args: list[str], log_path: Path,
                 startup_timeout_s: float) -> None:
        super().__init__(model, ["--served-model-name", SERVED_NAME, "--scheduler", scheduler, "--lora-modules",
                                 *(f"{n}={p}" for n, p in adapters.items()), *args], log_path, startup_timeout_s)


def served_adapters(base_url: str, api_key: str | None = None) -> list[str]:
    """The adapters a running server lists in `/v1/models` (entries with a `parent`), in name order."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach the server at {base_url} ({type(e).__name__}: {e}); start it (valora serve "
                        "MODEL) or fix --base-url") from e
    if r.status_code == 401:
        raise UserError(f"the server at {base_url} refused the API key; pass the right --api-key")
    if r.status_code != 200:
        raise UserError(f"{base_url}/v1/models answered HTTP {r.status_code}: is it an OpenAI-compatible server?")
    return sorted(m["id"] for m in r.json()["data"] if m.get("parent"))
