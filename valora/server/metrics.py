"""Prometheus metrics under vLLM's names with the `valora:` prefix, so existing dashboards and routers work.

Latency histograms are observed once per finished request, by the front end that served it. Engine state (queue
lengths, KV usage, adapters) is the engine core's stats snapshot, asked for at scrape time. With several API
servers (`--api-server-count`), `valora serve` sets prometheus_client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`) before starting them: each process writes its request-side series to a shared
folder and any of them answers a scrape with the sum over all.

With `vllm_compatible` (`--vllm-compatible-metrics`) the metrics vLLM exports under the same names are exported
under the `vllm:` prefix as well, with the same labels: routers that read vLLM's metrics (the Gateway API
Inference Extension's endpoint picker, llm-d's scorers: queue lengths, KV cache usage and the adapter affinity of
`vllm:lora_requests_info`) score a VaLoRA pod unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from valora.engine.llm_engine import EngineStats
from valora.orchestrator.cost_model import CostTally
from valora.outputs import RequestOutput

logger = logging.getLogger("valora.server")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # as vLLM does: no `*_created` series, which dashboards do not use

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
            80.0, 160.0, 640.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)

# Ours that vLLM exports under the same name and meaning. `lora_requests_info` is vLLM's gauge exactly: labels
# `max_lora`, `running_lora_adapters` and `waiting_lora_adapters` (adapter names, comma-separated; no
# `model_name`), value the time of the snapshot, so a reader takes the series with the largest value.
VLLM_NAMES = frozenset({
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "lora_requests_info", "num_preemptions",
    "prompt_tokens", "generation_tokens", "request_success", "time_to_first_token_seconds",
    "time_per_output_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
    "prefix_cache_queries", "prefix_cache_hits",
})
_NOT_VLLM_LABELS = {"lora_requests_info": ("model_name",)}


class _EngineCollector:
    def __init__(self, stats: Callable[[], EngineStats], model: str) -> None:
        self.stats, self.model = stats, model

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self.model], value)
        return g

    def _counter(self, name: str, doc: str, values: dict[str, int], label: str = "tier") -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name", label])
        for key, value in values.items():
            c.add_metric([self.model, key], value)
        return c

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        yield self._gauge("valora:num_requests_running", "Sequences in the running batch.", s.num_running)
        yield self._gauge("valora:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield self._gauge("valora:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).",
                          s.kv_cache_usage)
        info = GaugeMetricFamily("valora:lora_requests_info", "Adapters of running and waiting requests.",
                                 labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([self.model, str(s.max_loras), ",".join(s.running_adapters), ",".join(s.waiting_adapters)],
                        time.time())
        yield info
        yield self._gauge("valora:lora_slots_active", "Adapter slots used by running requests.",
                          len(s.running_adapters))
        yield self._gauge("valora:lora_slots_resident", "Adapter slots holding an adapter (in use or cached).",
                          len(s.resident_adapters))
        yield self._counter("valora:lora_adapter_loads", "Adapter loads: from disk to host memory, host to slot.",
                            {"disk": s.adapter_disk_loads, "slot": s.adapter_slot_loads})
        yield self._counter("valora:lora_adapter_evictions", "Adapters evicted from a slot or from host memory.",
                            {"slot": s.adapter_slot_evictions, "host": s.adapter_host_evictions})
        yield self._counter("valora:lora_adapter_hits", "Steps that found an adapter already in its slot.",
                            {"slot": s.adapter_slot_hits})
        yield self._counter("valora:image_embedding_cache", "Image embedding cache lookups by result.",
                            {"hit": s.image_cache_hits, "miss": s.image_cache_misses}, label="result")
        yield self._gauge("valora:lora_adapter_blocking_loads", "Adapter disk reads made on the step loop (stalls).",
                          s.adapter_blocking_loads)
        mode = GaugeMetricFamily("valora:inference_mode", "1 for the mode of the last step.",
                                 labels=["model_name", "mode", "scheduler", "hot_adapter"])
        for name in s.mode_steps or {"unmerged": 0}:
            mode.add_metric([self.model, name, s.scheduler, s.hot_adapter or ""], float(name == s.mode))
        yield mode
        labels = ["model_name", "mode"]
        steps = CounterMetricFamily("valora:mode_steps", "Engine steps per inference mode.", labels=labels)
        seconds = CounterMetricFamily("valora:mode_seconds", "Step time per inference mode.", labels=labels)
        for name, n in s.mode_steps.items():
            steps.add_metric([self.model, name], n)
            seconds.add_metric([self.model, name], s.mode_seconds[name])
        yield steps
        yield seconds
        yield from self._step_costs(s)
        yield self._counter("valora:host_pause_seconds", "Step-loop time lost since the engine was ready, by cause "
                            "(every running stream waits through it).", s.pause_seconds, label="cause")
        for name, doc, value in (("valora:mode_switches", "Changes of the merged adapter.", s.num_switches),
                                 ("valora:mode_switch_seconds", "Time spent switching modes.", s.switch_seconds),
                                 ("valora:num_preemptions", "Sequences preempted for KV blocks.", s.num_preemptions),
                                 ("valora:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  s.prefix_cache_queries),
                                 ("valora:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  s.prefix_cache_hits)):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model], value)
            yield c
        yield self._gauge("valora:prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache, since "
                          "start (0 to 1).", s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries
                          else 0.0)


    def _step_costs(self, s: EngineStats) -> Iterable[Metric]:
        """The policy's cost model: predicted step time (switches and graph captures excluded) against the
        measured one, per mode of the step; the ratio's histogram shows how far off single steps are."""
        labels = ["model_name", "mode"]
        families = [
            (CounterMetricFamily("valora:step_cost_steps", "Steps the scheduler's cost model priced.", labels=labels),
             lambda t: t.steps),
            (CounterMetricFamily("valora:step_cost_predicted_seconds", "Step time the cost model predicted.",
                                 labels=labels), lambda t: t.predicted_s),
            (CounterMetricFamily("valora:step_cost_measured_seconds", "Measured time of the steps it priced.",
                                 labels=labels), lambda t: t.measured_s),
            (CounterMetricFamily("valora:step_cost_abs_error_seconds", "Sum of |measured - predicted| step time.",
                                 labels=labels), lambda t: t.abs_error_s),
        ]
        ratio = HistogramMetricFamily("valora:step_cost_ratio", "Measured over predicted step time.", labels=labels)
        for mode, tally in s.step_costs.items():
            for family, value in families:
                family.add_metric([self.model, mode], value(tally))
            cumulative = list(itertools.accumulate(tally.ratio_counts))
            bounds = [*(str(b) for b in CostTally.RATIO_BUCKETS), "+Inf"]
            ratio.add_metric([self.model, mode], list(zip(bounds, cumulative)), tally.ratio_sum)
        yield from (f for f, _ in families)
        yield ratio


class _VLLMNames:
    """The source registry's metrics that vLLM also exports, renamed from `valora:` to `vllm:`."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        for metric in self.source.collect():
            name = metric.name.removeprefix("valora:")
            if name in VLLM_NAMES:
                alias = Metric("vllm:" + name, metric.documentation, metric.type, metric.unit)
                drop = _NOT_VLLM_LABELS.get(name, ())
                alias.samples = [s._replace(name="vllm:" + s.name.removeprefix("valora:"),
                                            labels={k: v for k, v in s.labels.items() if k not in drop})
                                 for s in metric.samples]
                yield alias


class ServerMetrics:
    def __init__(self, model: str, stats: Callable[[], EngineStats], vllm_compatible: bool = False) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        self.vllm_registry: CollectorRegistry | None = None
        if vllm_compatible:
            self.vllm_registry = CollectorRegistry(auto_describe=False)
            self.vllm_registry.register(_VLLMNames(self.registry))
        labels = ["model_name"]
        kw = {"labelnames": labels, "registry": self.registry}
        self.ttft = Histogram("valora:time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY, **kw)
        self.tpot = Histogram("valora:time_per_output_token_seconds", "Mean time per output token after the first.",
                              buckets=_PER_TOKEN, **kw)
        self.e2e = Histogram("valora:e2e_request_latency_seconds", "Arrival to last token.", buckets=_LATENCY, **kw)
        self.queue = Histogram("valora:request_queue_time_seconds", "Arrival to first scheduled step.",
                               buckets=_LATENCY, **kw)
        self.prompt_tokens = Counter("valora:prompt_tokens", "Prompt tokens processed.", **kw)
        self.generation_tokens = Counter("valora:generation_tokens", "Tokens generated.", **kw)
        self.success = Counter("valora:request_success", "Finished requests by finish reason.",
                               labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.engine_collector = _EngineCollector(stats, model)
        self.registry.register(self.engine_collector)

    def finished(self, out: RequestOutput) -> None:
        m = out.metrics
        tokens = max(len(c.token_ids) for c in out.outputs)
        self.prompt_tokens.labels(self.model).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(self.model).inc(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            self.success.labels(self.model, c.finish_reason or "stop").inc()
        if m is None or m.first_token_time is None or m.finished_time is None:
            return
        self.ttft.labels(self.model).observe(m.first_token_time - m.arrival_time)
        self.e2e.labels(self.model).observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue.labels(self.model).observe(m.first_scheduled_time - m.arrival_time)
        if tokens > 1:
            self.tpot.labels(self.model).observe((m.finished_time - m.first_token_time) / (tokens - 1))

    def aborted(self, n: int) -> None:
        self.success.labels(self.model, "abort").inc(n)

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # every API server's request-side series, summed
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self.engine_collector)
        else:
            registry = self.registry
        text = generate_latest(registry)
        return text + generate_latest(self.vllm_registry) if self.vllm_registry is not None else text


class StatsLogger:
    """vLLM's periodic stats line: every `interval_s` while there is work, prompt and generation throughput since
    the last line, running and waiting requests, KV cache use, the inference mode and the adapter slots."""

    def __init__(self, stats: Callable[[], EngineStats], interval_s: float = 5.0) -> None:
        self.stats, self.interval_s = stats, interval_s
        self._last: tuple[float, int, int] | None = None

    def line(self, now: float) -> str | None:
        """The line for the interval that ends now, or None when the engine had nothing to do in it."""
        s = self.stats()
        last, self._last = self._last, (now, s.prompt_tokens, s.generation_tokens)
        if last is None:
            return None
        t, prompt, generated = last
        span = max(now - t, 1e-9)
        if s.prompt_tokens == prompt and s.generation_tokens == generated and not s.num_running + s.num_waiting:
            return None
        mode = s.mode + (f" ({s.hot_adapter})" if s.hot_adapter else "")
        return (f"Avg prompt throughput: {(s.prompt_tokens - prompt) / span:.1f} tokens/s, "
                f"Avg generation throughput: {(s.generation_tokens - generated) / span:.1f} tokens/s, "
                f"Running: {s.num_running} reqs, Waiting: {s.num_waiting} reqs, "
                f"KV cache usage: {s.kv_cache_usage:.1%}, Mode: {mode}, "
                f"Adapter slots: {len(s.running_adapters)} active, {len(s.resident_adapters)}/{s.max_loras} resident")

    async def run(self, refresh: Callable[[], Awaitable] | None = None) -> None:
        """Log until cancelled (a task of the app's lifespan); `refresh()` brings the stats up to date first."""
        while True:
            if refresh is not None:
                await refresh()
            text = self.line(time.monotonic())
            if text is not None:
                logger.info(text)
            await asyncio.sleep(self.interval_s)
