"""`valora bench sweep`: for each scheduler start the server, warm it up, replay every workload x skew x rate
point, drain, and write the point before the next one starts; then the summary, plots and report.

A point already in the results directory is skipped, so an interrupted or partial sweep (e.g. one policy per GPU
session) continues where it stopped. Ctrl-C stops the server and leaves every finished point readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import logging
import math
import os
import platform
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from valora.bench.client import ClientConfig, Record, chat_body, replay
from valora.bench.results import Point, PointKey, is_done, load_points, save_point, write_summary
from valora.bench.scrape import Sample, mode_usage, poll, token_totals, wait_idle
from valora.bench.server import AdapterSpec, ModelSpec, ServerProcess, served_adapters
from valora.bench.summary import SLO, meets
from valora.bench.workload import MIXES, Arrivals, Lengths, Skew, Task, Workload
from valora.errors import UserError, from_mapping

logger = logging.getLogger("valora.bench")
POLICIES = ("valora", "slora", "punica", "dlora")
# What `--budget-s` reserves for a server's start and warm-up until this call has measured one (the H100 with the
# 7B sweep: about 100 s; reserving none started a server that then had no time left for a point)
SERVER_START_S = 120.0
WARMUP_DRAIN_S = 20.0  # seconds a warm-up load may run past its arrivals


@dataclass(frozen=True)
class ServerSpec:
    """How to reach the system under test: `valora serve` per scheduler, or one running server (`base_url`),
    reported under the policy name `name`."""

    schedulers: tuple[str, ...] = POLICIES
    args: tuple[str, ...] = ()  # further `valora serve` flags
    startup_timeout_s: float = 1800.0
    warmup_s: float = 10.0  # per server start and warm-up load (`warm_up_plan`), not recorded
    step_log: bool = True  # each server started writes logs/<server>.<n>.steps.jsonl.gz (`valora bench costs`)
    base_url: str | None = None
    name: str = "external"
    api_key: str | None = None

    @property
    def policies(self) -> tuple[str, ...]:
        return (self.name,) if self.base_url else self.schedulers


@dataclass(frozen=True)
class ServerVariant:
    """A server some workloads run on instead of the default one: its own adapter set (default: the model's) and
    `valora serve` flags after the common ones (a later flag wins)."""

    adapters: AdapterSpec | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkloadSpec:
    """One task mix swept over rates and skews, on the default server or a named `server` variant, drawing from
    the first `adapters` of its adapters (default: all), for every policy or only `policies`; `reference` names
    the workload it is compared with."""

    name: str
    mix: str | tuple[Task, ...]
    rates: tuple[float, ...]
    skews: tuple[str, ...] = ("zipf:1.0",)
    duration_s: float = 60.0
    warmup_s: float = 10.0
    arrivals: Arrivals = field(default_factory=Arrivals)
    pictures: int = 64
    image_size: tuple[int, int] | None = None
    server: str | None = None
    adapters: int | None = None
    reference: str | None = None
    policies: tuple[str, ...] | None = None

    def workload(self, rate: float, skew: str, adapters: tuple[str, ...], seed: int, duration_s: float | None = None,
                 warmup_s: float | None = None) -> Workload:
        """The point's requests over the server's `adapters` (this workload draws from the first `self.adapters`)."""
        if self.adapters is not None and self.adapters > len(adapters):
            raise UserError(f"workload {self.name!r} draws from {self.adapters} adapters; the server has "
                             f"{len(adapters)}")
        adapters = adapters[: self.adapters]
        return Workload(self.mix, rate, self.duration_s if duration_s is None else duration_s, adapters,
                        warmup_s=self.warmup_s if warmup_s is None else warmup_s, arrivals=self.arrivals,
                        skew=Skew.parse(skew), pictures=self.pictures, image_size=self.image_size, seed=seed)


@dataclass(frozen=True)
class SweepConfig:
    workloads: tuple[WorkloadSpec, ...]
    server: ServerSpec = field(default_factory=ServerSpec)
    model: ModelSpec | None = None  # needed unless server.base_url is set
    slo: SLO = field(default_factory=SLO)
    seed: int = 0
    drain_timeout_s: float = 120.0  # after the last arrival: then whatever still runs is aborted
    sample_interval_s: float = 0.1
    max_concurrency: int = 512
    timeline: dict[str, Any] | None = None  # {workload, skew, rate} of the valora run to draw; default: see report
    servers: dict[str, ServerVariant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = {w.name for w in self.workloads}
        for w in self.workloads:
            if w.server is not None and w.server not in self.servers:
                raise ValueError(f"workload {w.name!r}: no server {w.server!r} in `servers` ({sorted(self.servers)})")
            if w.reference is not None and w.reference not in names:
                raise ValueError(f"workload {w.name!r}: its reference {w.reference!r} is not a workload")
            variant = self.servers[w.server].adapters if w.server is not None else None
            spec = variant or (self.model.adapters if self.model is not None else None)
            if w.adapters is not None and spec is not None and w.adapters > spec.count:
                raise ValueError(f"workload {w.name!r} draws from {w.adapters} adapters; its server has {spec.count}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        """Raises `UserError` naming the key that is wrong (a typo, a missing or malformed entry)."""
        d = dict(d)
        model = d.pop("model", None)
        if model is not None:
            model = dict(model)
            if "path" not in model:
                raise UserError("model: needs a `path`")
            adapters = _adapters(model.pop("adapters", {}) or {}, "model.adapters")
            model = from_mapping(ModelSpec, {**model, "path": Path(model["path"]).expanduser(), "adapters": adapters},
                                 "model")
        server = dict(d.pop("server", {}) or {})
        for k in ("schedulers", "args"):
            if k in server:
                server[k] = tuple(str(a) for a in server[k])
        servers = {}
        for name, variant in (d.pop("servers", None) or {}).items():
            variant = dict(variant or {})
            if variant.get("adapters"):
                variant["adapters"] = _adapters(variant["adapters"], f"servers.{name}.adapters")
            variant["args"] = tuple(str(a) for a in variant.get("args", ()))
            servers[name] = from_mapping(ServerVariant, variant, f"servers.{name}")
        if not d.get("workloads"):
            raise UserError("the config lists no `workloads`")
        workloads = tuple(_workload(w, f"workloads[{i}]") for i, w in enumerate(d.pop("workloads")))
        server = from_mapping(ServerSpec, server, "server")
        slo = from_mapping(SLO, d.pop("slo", {}) or {}, "slo")
        return from_mapping(cls, {**d, "workloads": workloads, "server": server, "model": model, "slo": slo,
                                  "servers": servers}, "the config")

    @classmethod
    def load(cls, path: Path) -> SweepConfig:
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise UserError(f"cannot read the sweep config {path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise UserError(f"{path}: a sweep config is a YAML mapping (see benchmarks/cpu_sweep.yaml)")
        try:
            return cls.from_dict(data)
        except UserError as e:
            raise UserError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def _adapters(d: dict[str, Any], where: str) -> AdapterSpec:
    d = dict(d)
    for k in ("ranks", "targets"):
        if k in d:
            d[k] = tuple(d[k])
    if d.get("dir"):
        d["dir"] = Path(d["dir"]).expanduser()
    return from_mapping(AdapterSpec, d, where)


def _workload(d: dict[str, Any], where: str) -> WorkloadSpec:
    if not isinstance(d, dict) or "name" not in d:
        raise UserError(f"{where}: a workload is a mapping with a `name`")
    d = dict(d)
    where = f"workload {d['name']!r}"
    mix = d.pop("mix", d["name"])
    if isinstance(mix, str) and mix not in MIXES:
        raise UserError(f"{where}: unknown mix {mix!r}; known: {sorted(MIXES)}, or a list of tasks")
    if not isinstance(mix, str):  # inline tasks
        mix = tuple(from_mapping(Task, {**t, **{k: from_mapping(Lengths, t.get(k, {}), f"{where} task {k}")
                                                for k in ("prompt", "output")},
                                        "image_size": tuple(t.get("image_size", (448, 448)))}, f"{where} task")
                    for t in mix)
    for k in ("rates", "skews", "policies"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    if d.get("image_size"):
        d["image_size"] = tuple(d["image_size"])
    return from_mapping(WorkloadSpec, {**d, "mix": mix, "arrivals": from_mapping(Arrivals, d.pop("arrivals", {}) or {},
                                                                     f"{where} arrivals")}, where)


def run_info(config: SweepConfig) -> dict[str, Any]:
    try:  # VALORA_COMMIT names the commit of a copy of the tree without its .git (the GPU machine's)
        commit = os.environ.get("VALORA_COMMIT") or subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
            cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:  # not through torch: a CUDA context in this process would take memory from the server's GPU
        device = subprocess.check_output(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], text=True,
                                         stderr=subprocess.DEVNULL).strip().replace("\n", ", ")
    except (OSError, subprocess.CalledProcessError):
        device = f"cpu ({os.cpu_count()} cores)"
    return {"started": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit, "device": device,
            "host": platform.node(), "config": config.to_dict()}


async def run_point(base_url: str, workload: Workload, config: SweepConfig, api_key: str | None = None,
                    progress: bool = True) -> tuple[list[Record], list[Sample]]:
    """Replay one workload while polling `/metrics`; drain; return (records, /metrics samples)."""
    from tqdm import tqdm

    requests = workload.requests()
    for r in requests:  # encode every image and clip before the clock starts (they are cached)
        chat_body(r)
    bar = tqdm(total=len(requests), desc=f"  r={workload.rate:g}/s", unit="req", leave=False, disable=not progress)
    t0 = time.perf_counter() + 0.1
    stop = asyncio.Event()
    poller = asyncio.create_task(poll(base_url, t0, config.sample_interval_s, stop))
    limit = workload.warmup_s + workload.duration_s + config.drain_timeout_s
    try:
        records = await replay(requests, ClientConfig(base_url, limit, config.max_concurrency, api_key), t0,
                               on_done=lambda _: bar.update())
        if not await wait_idle(base_url, config.drain_timeout_s):
            logger.warning("the server still had requests %.0f s after the point ended", config.drain_timeout_s)
    finally:
        stop.set()
        samples = await poller
        bar.close()
    return records, samples


def warm_up_plan(points: list[tuple[PointKey, WorkloadSpec, str]]) -> list[tuple[WorkloadSpec, float, str]]:
    """What a server replays before its points, unrecorded: each workload at its highest rate, then at its lowest,
    under each skew its points use. A skew is what makes a policy merge and decides how many adapters a step holds,
    and the first step of each (tokens, adapters, mode) bucket builds its graph: on the H100, warmed over uniform
    adapters alone, the first Zipf point (8 req/s) met 22 such captures (0.1-0.26 s each, every stream waiting).
    The lowest rate comes last: a first point at 8 req/s after a warm-up at 40 alone missed the SLO that the same
    point met after a point at 6."""
    skews: dict[WorkloadSpec, dict[str, None]] = {}  # in the points' order, each once
    for _, spec, skew in points:
        skews.setdefault(spec, {})[skew] = None
    return [(spec, rate, skew) for spec, used in skews.items()
            for rate in dict.fromkeys((max(spec.rates), min(spec.rates))) for skew in used]


def _warm_up(base_url: str, config: SweepConfig, points: list[tuple[PointKey, WorkloadSpec, str]],
             adapters: tuple[str, ...]) -> None:
    """`warm_up_plan`, `server.warmup_s` seconds each; fails loudly if the server answers nothing (first-call
    compilation, adapter loads and allocator growth also happen here, not in the first point)."""
    if config.server.warmup_s <= 0:
        return
    # A load above the policy's capacity leaves a queue: what is left after this is aborted, not waited for
    brief = replace(config, drain_timeout_s=min(config.drain_timeout_s, WARMUP_DRAIN_S))
    for spec, rate, skew in warm_up_plan(points):
        w = spec.workload(rate, skew, adapters, config.seed + 7919, config.server.warmup_s, 0.0)
        records, _ = asyncio.run(run_point(base_url, w, brief, config.server.api_key, progress=False))
        if not any(r.ok for r in records):
            errors = {r.error for r in records if r.error}
            raise RuntimeError(f"no warm-up request of {spec.name} succeeded: {sorted(errors)[:3]}")


def plan(config: SweepConfig, policies: tuple[str, ...] | None = None, workloads: tuple[str, ...] | None = None,
         skews: tuple[str, ...] | None = None) -> list[tuple[PointKey, WorkloadSpec, str]]:
    """Every (point, its workload, its skew as written in the config), policy by policy."""
    chosen = policies or config.server.policies
    unknown = set(chosen) - set(config.server.policies)
    if unknown:
        raise UserError(f"policies {sorted(unknown)} are not in the config's {config.server.policies}")
    return [(PointKey(spec.name, Skew.parse(skew).label, policy, float(rate)), spec, skew)
            for policy in chosen for spec in config.workloads if not workloads or spec.name in workloads
            if spec.policies is None or policy in spec.policies
            for skew in spec.skews if not skews or skew in skews for rate in spec.rates]


def run_sweep(config: SweepConfig, out: Path, policies: tuple[str, ...] | None = None,
              workloads: tuple[str, ...] | None = None, progress: bool = True, budget_s: float | None = None,
              skews: tuple[str, ...] | None = None, all_rates: bool = False) -> int:
    """Run the points not yet in `out`, except, unless `all_rates`, those at a rate above one where their policy
    already missed the SLO under the same workload and skew (saturated: the slowest points, and ones that cannot
    change its highest rate within the SLO). Returns 0 when none is left, 75 when `budget_s` (seconds for this
    call) left no room for the next point, 130 when interrupted (Ctrl-C or SIGTERM); finished points stay."""
    from tqdm import tqdm

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)

    summary = out / "summary.json"
    missed = missed_slo(json.loads(summary.read_text())["points"] if summary.exists() else [], config.slo)

    def saturated(key: PointKey) -> bool:
        return not all_rates and key.rate > missed.get((key.workload, key.skew, key.policy), math.inf)

    todo = [p for p in plan(config, policies, workloads, skews) if not is_done(out, p[0]) and not saturated(p[0])]
    if not todo:
        return 0
    run_json = out / "run.json"
    runs = json.loads(run_json.read_text())["runs"] if run_json.exists() else []
    run_json.write_text(json.dumps({"runs": [*runs, run_info(config)]}, indent=2))
    if config.server.base_url is None and config.model is None:
        raise UserError("the config has neither `model` nor `server.base_url`")
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress)

    server_s = SERVER_START_S  # a server's start and warm-up: measured at each start of this call

    def over_budget(spec: WorkloadSpec, starting: bool = False) -> bool:  # could the next point end after it?
        need = spec.warmup_s + spec.duration_s + 30 + (server_s if starting else 0.0)
        if budget_s is None or time.monotonic() - start + need <= budget_s:
            return False
        logger.warning("time budget used: %d points left; run the same command again", bar.total - bar.n)
        return True

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:  # one server per (policy, server variant), started for its points only
        for policy, variant in dict.fromkeys((k.policy, spec.server) for k, spec, _ in todo):
            points = [p for p in todo if (p[0].policy, p[1].server) == (policy, variant)]
            if over_budget(points[0][1], starting=True):
                return 75
            adapters = _prepare(config, variant)
            started = time.monotonic()
            with _server(config, policy, variant, adapters, out) as url:
                names = tuple(adapters) or tuple(served_adapters(url, config.server.api_key))
                _warm_up(url, config, points, names)
                server_s = time.monotonic() - started
                for key, spec, skew in points:
                    if saturated(key):  # a lower rate of this call missed the SLO
                        logger.info("%s skipped: %s missed the SLO at a lower rate", key.stem, key.policy)
                        bar.update()
                        continue
                    if over_budget(spec):
                        return 75
                    bar.set_description(key.stem)
                    w = spec.workload(key.rate, skew, names, config.seed)
                    save_point(out, _record_point(url, key, spec, w, config, progress))
                    missed = missed_slo(write_summary(out, load_points(out), config.slo), config.slo)
                    bar.update()
    except KeyboardInterrupt:
        logger.warning("interrupted: the finished points are in %s", out)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    return 0


def missed_slo(rows: list[dict[str, Any]], slo: SLO) -> dict[tuple[str, str, str], float]:
    """The lowest rate at which each (workload, skew, policy) of a summary's rows missed the SLO."""
    lowest: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if not meets(r["slo_attainment"], slo.attainment):
            k = (r["workload"], r["skew"], r["policy"])
            lowest[k] = min(lowest.get(k, math.inf), r["rate"])
    return lowest


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # so that a job killed with SIGTERM stops its server and keeps its finished points


def _record_point(url: str, key: PointKey, spec: WorkloadSpec, w: Workload, config: SweepConfig,
               progress: bool) -> Point:
    started = datetime.datetime.now().isoformat(timespec="seconds")
    records, samples = asyncio.run(run_point(url, w, config, config.server.api_key, progress))
    meta = {"started": started, "mix": spec.mix if isinstance(spec.mix, str) else "custom",
            "duration_s": w.duration_s, "warmup_s": w.warmup_s, "arrivals": asdict(w.arrivals), "seed": w.seed,
            "adapters": list(w.adapters), "modes": mode_usage(samples, w.warmup_s),
            "server_tokens": token_totals(samples)}
    return Point(key, records, samples, meta)


def _prepare(config: SweepConfig, variant: str | None) -> dict[str, Path]:
    """The adapters a server is started with (built when missing); none for a server the sweep does not start."""
    if config.server.base_url is not None:
        return {}
    spec = config.servers[variant].adapters if variant is not None else None
    return config.model.prepare(spec, variant if spec is not None else None)


def _server(config: SweepConfig, policy: str, variant: str | None, adapters: dict[str, Path], out: Path):
    if config.server.base_url is not None:
        return contextlib.nullcontext(config.server.base_url)
    label = policy if variant is None else f"{policy}-{variant}"
    args = [*config.server.args, *(config.servers[variant].args if variant is not None else ())]
    logs = out / "logs"
    if config.server.step_log:
        n = next(i for i in itertools.count() if not (logs / f"{label}.{i}.steps.jsonl.gz").exists())
        args += ["--step-log", str(logs / f"{label}.{n}.steps.jsonl.gz")]
    return ServerProcess(config.model.path, adapters, policy, args, logs / f"{label}.log",
                         config.server.startup_timeout_s)
