"""`LLMEngine`, the engine core: ready requests in (`add_request`), one continuous-batching step at a time
(`step`), each step's new tokens out.

It owns the model, the paged KV cache, the adapter manager, the orchestrator and the scheduler, and nothing
about text: requests arrive tokenised with their image tensors (`engine/input_processor.py`, in the front end),
and outputs leave as token deltas (`engine/output_processor.py` makes text of them). It ends sequences on what a
token decides (stop ids, max_tokens, the context length, a grammar, a head's answer); stop strings are the front
end's. It runs in the server's engine-core process (`engine/core_proc.py`) or inside the caller's
(`engine/inproc.py`). A request that cannot be served (its adapter is gone, its head unknown, its grammar
invalid) is refused in `add_request` with an error that names the problem, and everything already accepted
keeps running. The tokenizer is loaded for the grammar compiler's vocabulary only: nothing here encodes text.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from valora.config import EngineConfig, LoRAConfig, resolve_device, resolve_dtype
from valora.engine.block_manager import BlockManager
from valora.engine.errors import AdapterNotLoadedError
from valora.engine.host_pauses import HostPauses
from valora.engine.input_processor import eos_token_ids
from valora.engine.model_runner import ModelRunner, RunInfo
from valora.engine.preflight import check_engine_config
from valora.engine.request import EngineCoreOutput, EngineCoreRequest
from valora.engine.scheduler import Scheduler
from valora.engine.sequence import PENDING, Sequence, SequenceStatus
from valora.engine.startup import StartupPhases
from valora.engine.structured_outputs import GrammarCompiler
from valora.engine.tensor_parallel import Replicas
from valora.heads import HeadParams, HeadSet, answer_all, load_heads
from valora.lora.manager import LoRAManager
from valora.lora.request import LoRARequest
from valora.models.loader import build_model
from valora.models.registry import resolve_family
from valora.multimodal.cache import EmbeddingCache
from valora.multimodal.inputs import InputError, ProcessedPrompt
from valora.orchestrator.cost_model import CostTally, StepWork
from valora.orchestrator.modes import Mode, ModeSwitcher, step_mode
from valora.orchestrator.policy import Decision, Policy, SchedulerView, StepRecord, make_policy
from valora.orchestrator.step_log import StepLog
from valora.outputs import HeadOutput
from valora.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WARM_IMAGE_PX = 448  # the warm-up image: Qwen-VL's size in the paper (256 visual tokens for Qwen2-VL)


@dataclass
class InFlight:
    """A launched step: its sequences, where each started and the tokens it computes, where in its output the
    token it samples goes (None: it samples none), their stop ids, the function that waits for its results, and
    what the policy is told once they are in."""

    seqs: list[Sequence]
    starts: list[int]
    num_tokens: list[int]
    outputs: list[int | None]
    stop_ids: list[frozenset[int]]
    results: Callable[[], list]
    hot: str | None
    started: float
    switch_s: float
    merged_bytes: int
    run: RunInfo
    slot_load_bytes: int
    costs: dict[str | None, float] | None
    # Seconds moved into this step's measured time from the window of the step collected before it: a step
    # launched ahead switches modes and captures graphs while that one is in flight (its one-off costs belong to
    # it, not to the step whose collection waited for them); negative on the step that gave them.
    carried_s: float = 0.0
    pause_mark: tuple[float, float] = (0.0, 0.0)  # the process's collection, compilation seconds at its launch
    launch_s: float = 0.0  # the host's time to schedule, prepare and queue the step (switch and captures included)
    outside_mark: float = 0.0  # the engine's time outside `step` so far, when it was launched


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    running_adapters: list[str]
    waiting_adapters: list[str]
    resident_adapters: list[str]
    max_loras: int
    adapter_disk_loads: int
    adapter_slot_loads: int
    adapter_slot_evictions: int
    adapter_host_evictions: int
    adapter_slot_hits: int
    adapter_blocking_loads: int
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found there
    image_cache_hits: int
    image_cache_misses: int
    scheduler: str
    mode: str  # of the last step
    hot_adapter: str | None
    mode_steps: dict[str, int]
    mode_seconds: dict[str, float]
    num_switches: int
    switch_seconds: float
    prompt_tokens: int = 0  # prompt tokens prefilled so far (recomputed ones again)
    generation_tokens: int = 0  # tokens generated so far
    step_costs: dict[str, CostTally] = field(default_factory=dict)  # the policy's predicted step time against
    #                                                                 the measured one, per mode
    pause_seconds: dict[str, float] = field(default_factory=dict)  # step-loop time lost since ready, by cause


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.hf_config = check_engine_config(config)  # before any weight loads: a bad flag fails in milliseconds
        self.config = config
        self.device = resolve_device(config.device)
        self.startup = StartupPhases(self.device)
        torch.manual_seed(config.seed)
        model_dir = Path(config.model)
        self.family = resolve_family(self.hf_config)
        text_cfg = getattr(self.hf_config, "text_config", self.hf_config)
        ckpt_dtype = getattr(text_cfg, "dtype", None) or getattr(self.hf_config, "dtype", None)
        if isinstance(ckpt_dtype, str):
            ckpt_dtype = getattr(torch, ckpt_dtype, None)
        self.dtype = resolve_dtype(config.dtype, ckpt_dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        # Tensor parallelism: the other ranks' workers, and this process in their group (before the model is built:
        # its layers take their shares of the weights from the group)
        self.replicas = (Replicas(config, self.hf_config, self.dtype, self.device)
                         if config.tensor_parallel_size > 1 else None)
        with self.startup.phase("weights"):
            self.model = self._load_model(model_dir)
        self.model.vision_backend = config.multimodal.mm_encoder_attn_backend
        self.clock = time.time
        self.lora_manager: LoRAManager | None = None
        self.policy: Policy | None = None
        self.switcher: ModeSwitcher | None = None
        self.draining: set[str] = set()  # adapters to unload once their requests finish
        self.heads: dict[str, HeadSet | None] = {}  # task heads of each registered adapter (None: it has none)
        if config.enable_lora:
            with self.startup.phase("lora"):  # the device's measured rates included
                self._init_lora()
        self.grammars = GrammarCompiler(self.tokenizer, self.model.decoder_config.vocab_size,
                                        eos_token_ids(model_dir, self.tokenizer))
        self.max_model_len = config.max_model_len or getattr(text_cfg, "max_position_embeddings", 4096)
        sc = config.scheduler
        # Chunked prefill splits prompts to fit the budget, which then bounds every step's latency (2048 by default,
        # as vLLM's server); without it a step must hold a whole prompt.
        chunked = sc.enable_chunked_prefill
        self.max_batched_tokens = sc.max_num_batched_tokens or (2048 if chunked else max(self.max_model_len, 2048))
        with self.startup.phase("kv_cache"):
            blocks = BlockManager(self._num_kv_blocks(), config.cache.block_size, config.cache.enable_prefix_caching)
        capacity = blocks.num_blocks * blocks.block_size
        if capacity < self.max_model_len:
            logger.warning("KV cache holds %d tokens; lowering max_model_len from %d", capacity, self.max_model_len)
            self.max_model_len = capacity
        self.max_batched_tokens = max(self.max_batched_tokens, sc.max_num_seqs, 0 if chunked else self.max_model_len)
        self.blocks = blocks
        cache_mb = config.multimodal.embed_cache_mb
        self.embed_cache = EmbeddingCache(cache_mb * 2**20) if cache_mb > 0 else None
        self.runner = ModelRunner(self.model, blocks, self.dtype, self.device, self.embed_cache,
                                  max_blocks_per_seq=blocks.blocks_for(self.max_model_len), replicas=self.replicas)
        if self.device.type == "cuda":
            self.runner.enable_cuda_graphs(sc.max_num_seqs, config.lora.max_loras, capture=not config.enforce_eager,
                                           max_num_batched_tokens=self.max_batched_tokens, phases=self.startup)
            if self.replicas is None:
                with self.startup.phase("vision_warmup"):
                    self.warm_vision()
        # The encoder compute budget: by default the token budget with chunked prefill (Scheduler says why), none
        # without (whole prompts, as before) unless set.
        max_encoder_tokens = sc.max_num_encoder_input_tokens or (self.max_batched_tokens if chunked else None)
        graphs = self.runner.token_graphs
        self.scheduler = Scheduler(sc, blocks, self.max_batched_tokens,
                                   config.lora.max_loras if config.enable_lora else None,
                                   max_encoder_tokens=max_encoder_tokens, embed_cache=self.embed_cache,
                                   max_prompt_seqs=graphs.max_seqs if graphs is not None and graphs.capture else None)
        self.requests: dict[str, Sequence] = {}  # unfinished ones
        self._seq_ids = itertools.count()
        # Launched steps not collected yet, oldest first: one, or two while the next step was launched ahead of
        # collecting the previous one (asynchronous scheduling).
        self._inflight: deque[InFlight] = deque()
        self.stalled = False  # the last step launched nothing while requests wait (for an adapter's reload, say)
        self._collected_at = 0.0  # when the last step was collected (the next one's device time starts there)
        self._left_at = 0.0  # when `step` last returned
        self._outside_s = 0.0  # seconds spent outside `step` while a step was in flight, so far
        self.num_steps_ahead = 0  # steps launched before the previous one was collected
        self.num_prompt_tokens = self.num_generation_tokens = 0
        self.step_log = StepLog(config.step_log) if config.step_log else None
        self._unlogged: list[StepRecord] = []  # records the step log takes once the next step is launched
        self.pauses = HostPauses(self.device)
        self._ready_pauses = self._pauses_so_far()  # what start-up spent is not a stall
        logger.info(
            "engine ready: %s (%s) on %s in %s, KV cache %d blocks x %d tokens, max_model_len %d; start-up %s",
            model_dir.name, self.family.name, self.device, str(self.dtype).removeprefix("torch."),
            blocks.num_blocks, blocks.block_size, self.max_model_len, self.startup.summary(),
        )

    # -- start-up -------------------------------------------------------------------------------------------
    def _init_lora(self) -> None:
        from valora.orchestrator.cost_model import DeviceRates, StepCostModel

        sc, lc = self.config.scheduler, self.config.lora
        rates = DeviceRates.measure(self.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.policy = make_policy(sc.policy, max_wait_ms=sc.max_wait_ms, rates=rates,
                                  costs=StepCostModel.for_device(self.device, weight_bytes, rates))
        backend = lc.backend
        if backend == "auto" and self.device.type == "cuda" and self.policy.lora_backend:
            backend = self.policy.lora_backend  # each baseline runs the kernel its system used
        lora_config = LoRAConfig(lc.max_loras, lc.max_lora_rank, lc.max_cpu_loras, backend)
        self.lora_manager = LoRAManager(self.model, self.model.mapper, lora_config, self.dtype, self.device)
        self.switcher = ModeSwitcher(self.lora_manager, graphs=not self.config.enforce_eager)
        if self.replicas is not None:
            self.replicas.call("init_lora", lora_config, self.policy.merges)
            self.lora_manager.replicas = self.replicas
        if self.policy.merges:
            self.switcher.reserve()  # before the KV cache takes the remaining memory
        self._merge_bytes: dict[str, int] = {}
        self.mode_steps = {m.value: 0 for m in Mode}
        self.mode_seconds = {m.value: 0.0 for m in Mode}
        self.step_costs = {m.value: CostTally() for m in Mode}
        self.last_mode = Mode.UNMERGED

    def _load_model(self, model_dir: Path) -> torch.nn.Module:
        t0 = time.perf_counter()
        model = build_model(self.family, self.hf_config, model_dir, self.dtype, self.device)
        logger.info("loaded %s weights in %.1f s", model_dir.name, time.perf_counter() - t0)
        return model

    def _num_kv_blocks(self) -> int:
        cc = self.config.cache
        per_block = ModelRunner.kv_bytes_per_block(self.model, cc.block_size, self.dtype)
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type == "cuda":
            return self._profile_kv_blocks(per_block)
        return max(1, int(cc.cpu_kv_cache_gb * 2**30) // per_block)

    def warm_vision(self, size: int = WARM_IMAGE_PX) -> bool:
        """Run one `size`-pixel square image, as a request's chat prompt, through the vision pass (its bucket's
        graph captured, models/vision_graphs.py) and the LM on scratch blocks: the first request with an image then
        neither builds the tower's kernels nor captures its graph (3.3 s of the H100 sweep's first step). Nothing
        it computes is kept. Whether it ran (a failure is logged and serving starts anyway)."""
        from PIL import Image

        from valora.engine.input_processor import InputProcessor
        from valora.multimodal.chat import MediaSources

        start = time.perf_counter()
        try:
            inputs = InputProcessor(self.config, self.max_model_len)
            image = Image.new("RGB", (size, size), (127, 127, 127))
            prompt = inputs.chat_prompt([{"role": "user", "content": [
                {"type": "image_pil", "image_pil": image}, {"type": "text", "text": "warm-up"}]}], MediaSources())
            self._run_scratch(inputs.process(prompt)[1], "warm-up")
        except Exception as e:  # noqa: BLE001 - a warm-up must never stop a server that can serve
            logger.warning("the vision warm-up failed (%s: %s); the first image request pays for it instead",
                           type(e).__name__, e)
            return False
        logger.info("warmed the vision pass with a %dx%d image in %.1f s", size, size, time.perf_counter() - start)
        return True

    def _run_scratch(self, prompt: ProcessedPrompt, name: str) -> None:
        """`prompt`'s prefill once, on scratch blocks and a runner of their own (on every tensor-parallel rank),
        both gone on return: start-up's measuring and warming runs, which leave the engine's cache untouched."""
        block_size = self.config.cache.block_size
        tokens = len(prompt.token_ids)
        scratch = BlockManager(-(-tokens // block_size), block_size)
        runner = ModelRunner(self.model, scratch, self.dtype, self.device, replicas=self.replicas, name=name)
        seq = Sequence(-1, name, 0, prompt, SamplingParams(temperature=0), None, 0.0)
        scratch.allocate(seq, tokens)
        runner.run([seq], [tokens], {}, [set()])
        if self.replicas is not None:
            self.replicas.call("drop_runner", name)

    def _profile_kv_blocks(self, per_block: int) -> int:
        """Run the largest step once on a scratch cache; what the peak leaves under the target is KV cache."""
        cc = self.config.cache
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._run_scratch(ProcessedPrompt([0] * min(self.max_batched_tokens, self.max_model_len)), "profile")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info()
        usable = int(total * cc.gpu_memory_utilization) - peak
        if usable < per_block:
            raise RuntimeError(
                f"no memory left for the KV cache: peak use {peak / 2**30:.1f} GiB of "
                f"{total * cc.gpu_memory_utilization / 2**30:.1f} GiB allowed; raise --gpu-memory-utilization"
            )
        n = usable // per_block
        logger.info("KV cache: %.1f GiB, %d tokens (peak step memory %.1f GiB)", n * per_block / 2**30,
                    n * cc.block_size, peak / 2**30)
        return n

    # -- adapters -------------------------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load and validate an adapter (disk I/O on the caller's thread, never inside `step`)."""
        if self.lora_manager is None:
            raise InputError("LoRA is disabled; start the engine with enable_lora=True")
        if lora_request.lora_name in self.draining:
            raise InputError(f"adapter {lora_request.lora_name!r} is being unloaded")
        name = lora_request.lora_name
        known = name in self.heads
        heads = None if known else load_heads(name, lora_request.lora_path, self.model.decoder_config.hidden_size,
                                               self.device)
        self.lora_manager.register(lora_request)
        if not known:
            self.heads[name] = heads

    def remove_lora(self, name: str) -> bool:
        """Unload an adapter. If requests still use it, it stops taking new ones and goes once they finish;
        returns whether it is gone already."""
        if self.lora_manager is None:
            raise InputError("LoRA is disabled")
        if name not in self.lora_manager.requests:
            raise InputError(f"adapter {name!r} is not loaded")
        if any(s.lora_name == name for s in self.requests.values()):
            if name not in self.draining:
                logger.info("adapter %s takes no new requests; it is unloaded once its running ones finish", name)
            self.draining.add(name)
            return False
        if self.switcher is not None and self.switcher.hot == name:
            self.switcher.switch(None, None)
        self.lora_manager.unregister(name)
        self.heads.pop(name, None)
        self._merge_bytes.pop(name, None)
        self.draining.discard(name)
        return True

    def pin_lora(self, name: str, pinned: bool = True) -> None:
        """Keep an adapter in host memory and in a GPU slot (a hot adapter should not pay for reloads)."""
        if self.lora_manager is None:
            raise InputError("LoRA is disabled")
        self.lora_manager.pin(name, pinned)

    def _adapter_bytes(self, name: str) -> int:
        return self.lora_manager.info[name].nbytes

    def _merge_bytes_of(self, name: str) -> int:
        """Base weights that merging `name` rewrites: every layer it targets, whole."""
        if name not in self._merge_bytes:
            layers = self.lora_manager.layers
            paths = self.lora_manager.info[name].targets
            self._merge_bytes[name] = sum(layers[p].weight.numel() * layers[p].weight.element_size() for p in paths)
        return self._merge_bytes[name]

    def list_loras(self) -> list[str]:
        return self.lora_manager.names if self.lora_manager else []

    # -- requests -------------------------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a ready request (n = 1). Its adapter must be loaded (`add_lora`) and not being unloaded. With
        `HeadParams` the adapter's task head answers after the prefill, and the request ends there."""
        if req.request_id in self.requests:
            raise InputError(f"request id {req.request_id!r} is already in use")
        lora_name = req.lora.lora_name if req.lora is not None else None
        if req.lora is not None:
            known = self.lora_manager.requests.get(lora_name) if self.lora_manager is not None else None
            if known is None or known.lora_path != req.lora.lora_path or lora_name in self.draining:
                raise AdapterNotLoadedError(f"The adapter `{lora_name}` is not loaded", "model_not_found", "model")
        params = req.params
        grammar = gen = None
        if isinstance(params, HeadParams):
            params = self._head_params(params, lora_name)
        else:
            if params.n != 1:
                raise InputError("the engine core runs one sequence per request: fan n out into n requests")
            if params.structured_outputs is not None:
                grammar = self.grammars.compile(params.structured_outputs)
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(next(self._seq_ids), req.request_id, 0, req.prompt, params, lora_name, req.arrival_time, gen)
        seq.stop_ids = req.stop_token_ids
        seq.deadline = req.arrival_time + req.deadline_s if req.deadline_s is not None else None
        if req.lora is not None:
            info = self.lora_manager.info[lora_name]
            seq.adapter_key = info.key
            seq.vision_tag = info.key if info.changes_images else None
        seq.grammar = grammar
        self.requests[req.request_id] = seq
        self.scheduler.add(seq)

    def _head_params(self, params: HeadParams, lora_name: str | None) -> HeadParams:
        """`params` with the head that will answer named (checked now, so the step never fails on it)."""
        heads = self.heads.get(lora_name) if lora_name is not None else None
        if heads is None:
            raise InputError("only a LoRA adapter with a task head can answer with one"
                             + (f"; {lora_name!r} has none" if lora_name else ""))
        try:
            return HeadParams(heads.resolve(params.head))
        except KeyError as e:
            raise InputError(f"adapter {lora_name!r}: {e.args[0]}") from e

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            seq = self.requests.pop(rid, None)
            if seq is not None:
                self.scheduler.remove(seq)
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"

    abort = abort_request

    def stats(self) -> EngineStats:
        """A snapshot for metrics and health checks (cheap; no device work)."""
        sched = self.scheduler
        lora = self.lora_manager
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_cache_usage=self.blocks.usage,
            running_adapters=sorted({s.lora_name for s in sched.running if s.lora_name}),
            waiting_adapters=sorted({s.lora_name for s in sched.waiting if s.lora_name}),
            resident_adapters=lora.resident() if lora else [],
            max_loras=self.config.lora.max_loras if lora else 0,
            adapter_disk_loads=lora.stats.disk_loads if lora else 0,
            adapter_slot_loads=lora.stats.slot_loads if lora else 0,
            adapter_slot_evictions=lora.stats.slot_evictions if lora else 0,
            adapter_host_evictions=lora.stats.host_evictions if lora else 0,
            adapter_slot_hits=lora.stats.slot_hits if lora else 0,
            adapter_blocking_loads=lora.stats.blocking_loads if lora else 0,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=sched.prefix_queries,
            prefix_cache_hits=sched.prefix_hits,
            image_cache_hits=self.embed_cache.hits if self.embed_cache else 0,
            image_cache_misses=self.embed_cache.misses if self.embed_cache else 0,
            scheduler=self.policy.name if self.policy else "fcfs",
            mode=self.last_mode.value if self.policy else Mode.UNMERGED.value,
            hot_adapter=self.switcher.hot if self.switcher else None,
            mode_steps=dict(self.mode_steps) if self.policy else {},
            mode_seconds=dict(self.mode_seconds) if self.policy else {},
            num_switches=self.switcher.num_switches if self.switcher else 0,
            switch_seconds=self.switcher.switch_seconds if self.switcher else 0.0,
            prompt_tokens=self.num_prompt_tokens,
            generation_tokens=self.num_generation_tokens,
            step_costs={m: t.copy() for m, t in self.step_costs.items() if t.steps} if self.policy else {},
            pause_seconds={k: v - self._ready_pauses[k] for k, v in self._pauses_so_far().items()},
        )

    def _pauses_so_far(self) -> dict[str, float]:
        """Seconds the step loop has lost to each host pause so far: CUDA graphs captured at first use, garbage
        collections, Triton builds at first use (engine/host_pauses.py; the step log says which steps)."""
        gc_s, compile_s = HostPauses.mark()
        return {"graph_capture": self.runner.capture_seconds(), "gc": gc_s, "kernel_compile": compile_s}

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one device); the engine is unusable afterwards."""
        if self.replicas is not None:
            self.replicas.close()
            self.replicas = None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._inflight)

    def wait_for_adapters(self, timeout_s: float) -> None:
        """Block until an adapter reload in the background finishes (at most `timeout_s`): what a loop whose last
        step was `stalled` should do instead of stepping again at once."""
        if self.lora_manager is not None:
            self.lora_manager.wait_for_loads(timeout_s)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step -------------------------------------------------------------------------------------------
    def _decide(self) -> Decision:
        if self.policy is None:
            return Decision()
        sched = self.scheduler
        return self.policy.decide(SchedulerView(
            waiting=list(sched.waiting), running=list(sched.running), hot=self.switcher.hot, now=self.clock(),
            max_num_seqs=self.config.scheduler.max_num_seqs, max_batched_tokens=self.max_batched_tokens,
            adapter_bytes=self._adapter_bytes, merge_bytes=self._merge_bytes_of, held=self.switcher.held,
        ))

    def _adapters_ready(self) -> dict[str, bool]:
        """Which adapters of queued requests can run this step. Reloads start in the background only for the
        adapters of the running requests and of the next ones in line (half the host cache ahead): loading
        for the back of a long queue would evict what the front needs."""
        manager = self.lora_manager
        if manager is None:
            return {}
        manager.begin_step()
        lc, sched = self.config.lora, self.scheduler
        lookahead = max(lc.max_loras, lc.max_cpu_loras // 2)
        ready: dict[str, bool] = {}
        for seq in [*sched.running, *sched.waiting]:
            name = seq.lora_name
            if name is None or name in ready:
                continue
            ready[name] = manager.ready(name, load=len(ready) < lookahead)
        return ready

    def _fail_unloadable(self) -> list[EngineCoreOutput]:
        """Requests whose adapter could not be reloaded (its directory changed) end with the reason."""
        failed = self.lora_manager.failed if self.lora_manager else {}
        outputs = []
        for seq in [s for s in self.requests.values() if s.lora_name in failed]:
            self.abort_request(seq.request_id)
            outputs.append(EngineCoreOutput(seq.request_id, [], finish_reason="abort", error=(
                f"adapter {seq.lora_name!r} became unavailable: {failed[seq.lora_name]}")))
        return outputs

    def _unload_drained(self) -> None:
        busy = {s.lora_name for s in self.requests.values()}
        for name in [n for n in self.draining if n not in busy]:
            self.remove_lora(name)

    def step(self) -> list[EngineCoreOutput]:
        """One model step's new tokens. The next step is launched before the outputs of the last one are built, so
        the device never waits for the host's bookkeeping; text is made from them elsewhere (the front end's output
        processor), never on this loop. With asynchronous scheduling (the default) the next step is even launched
        before the last one is collected: its sequences' new input tokens are read on the device from the
        sampler's output, and a sequence that the collected token ends (a stop token, say) is found one step late,
        its extra token dropped. So the host schedules and prepares step n+1 while the device runs step n."""
        entered = time.perf_counter()
        if self._inflight:  # the caller's time since the last call (requests in, outputs out) ran inside a step
            self._outside_s += entered - self._left_at
        try:
            return self._step()
        finally:
            self._left_at = time.perf_counter()

    def _step(self) -> list[EngineCoreOutput]:
        failed = self._fail_unloadable()
        self.stalled = False
        if not self._inflight and not self._launch():  # an idle engine: nothing to collect yet
            self.stalled = self.scheduler.has_work()
            self._unload_drained()
            return failed
        ahead = self._may_launch_ahead() and self._launch()
        self.num_steps_ahead += ahead
        done = self._collect()
        self.runner.finish_sampling()  # a step launched ahead with grammars: its masks can be computed now
        launched = ahead or self._launch()
        if self.step_log is not None:  # while the device runs the step just launched
            self.step_log.write(self._unlogged)
            self._unlogged.clear()
        outputs = failed + [self._output(s, t) for s, t in done]
        if not launched or self.draining:
            self._unload_drained()
        return outputs

    def _may_launch_ahead(self) -> bool:
        """Whether the next step may be scheduled before the one in flight is collected: asynchronous scheduling
        is on and no other tensor-parallel rank needs the batch's token ids on its host. A step with sequences
        that follow a grammar is launched with its sampler deferred (their next bitmask needs the token in
        flight on the host): `step` queues the sampler once that token is collected."""
        return self.config.scheduler.async_scheduling and len(self._inflight) == 1 and self.runner.replicas is None

    def _release_ending(self) -> None:
        """Running sequences whose token in flight is surely their last (max_tokens or the context length reached)
        give back their seat and blocks now, as they would at its collection: the next step, launched ahead, can
        admit others in their place. Their computed blocks go to the prefix cache first; the step in flight still
        writes their KV before any later step reuses a block (one stream)."""
        for seq in [s for s in self.scheduler.running if s.output_ids and s.output_ids[-1] == PENDING]:
            max_tokens = seq.params.max_tokens
            if (max_tokens is not None and len(seq.output_ids) >= max_tokens) or len(seq) >= self.max_model_len:
                self.blocks.cache_blocks(seq)
                self.scheduler.remove(seq)

    def _launch(self) -> bool:
        """Schedule the next step and queue its device work; whether there was anything to run."""
        t0, pause_mark = time.perf_counter(), HostPauses.mark()
        self._release_ending()
        ready = self._adapters_ready()
        decision = self._decide()
        if decision.hot is not None and not ready.get(decision.hot, False):
            decision.hot = self.switcher.hot if ready.get(self.switcher.hot, False) else None
        sched = self.scheduler.schedule(decision, lambda s: s.lora_name is None or ready[s.lora_name])
        if sched.empty:
            return False
        names = {s.lora_name for s in sched.seqs if s.lora_name is not None}
        if decision.hot is not None:
            names.add(decision.hot)
        loaded = self.lora_manager.stats.slot_load_bytes if self.lora_manager else 0
        slots = self.lora_manager.activate(names) if names else {}
        loaded = (self.lora_manager.stats.slot_load_bytes if self.lora_manager else 0) - loaded
        switch_s, merged_bytes = 0.0, 0
        if self.switcher is not None:  # merged bytes: only what the switch rewrote (re-merging the held one is free)
            switch_s = self.switcher.switch(decision.hot, slots.get(decision.hot))
            merged_bytes = self._merge_bytes_of(decision.hot) if self.switcher.rewrote else 0
        scheduled_at = self.clock()
        for seq in sched.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = scheduled_at  # queue time ends here, before this step's prefill
                seq.num_cached_tokens = seq.num_computed  # what the prefix cache gave it
        stop_ids = [s.stop_ids for s in sched.seqs]
        defer = bool(self._inflight) and any(s.grammar is not None for s in sched.seqs)
        results = self.runner.launch(sched.seqs, sched.num_tokens, slots, stop_ids, slots.get(decision.hot),
                                     defer_sampling=defer)
        if self.lora_manager is not None:  # fill free slots for the next requests in line, off the critical path
            upcoming = [s.lora_name for s in self.scheduler.waiting if s.lora_name and ready.get(s.lora_name)]
            self.lora_manager.prefetch(upcoming[: self.config.lora.max_loras])
        starts, outputs = self._advance(sched.seqs, sched.num_tokens)
        step = InFlight(list(sched.seqs), starts, list(sched.num_tokens), outputs, stop_ids, results, decision.hot,
                        t0, switch_s, merged_bytes, self.runner.last_run, loaded, decision.costs, pause_mark=pause_mark,
                        launch_s=time.perf_counter() - t0, outside_mark=self._outside_s)
        if self._inflight:  # launched ahead: its switch and captures ran inside the last step's window
            step.carried_s = switch_s + step.run.capture_s
            self._inflight[-1].carried_s -= step.carried_s
        self._inflight.append(step)
        return True

    def _advance(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[list[int], list[int | None]]:
        """Move the launched step's sequences on as if it were done, so the next one can be scheduled before it
        is: their tokens count as computed, and each that samples holds a PENDING token until it is collected.
        Returns where each started and where its token goes."""
        starts, outputs = [], []
        for seq, n in zip(seqs, num_tokens):
            starts.append(seq.num_computed)
            self.num_prompt_tokens += max(0, min(seq.num_computed + n, seq.prompt_len) - seq.num_computed)
            seq.num_computed += n
            samples = seq.num_computed == len(seq) and not isinstance(seq.params, HeadParams)
            if samples:
                seq.output_ids.append(PENDING)
            outputs.append(len(seq.output_ids) - 1 if samples else None)
        return starts, outputs

    def _collect(self) -> list[tuple[Sequence, int | None]]:
        """Wait for the oldest launched step's results and apply them: the new tokens (in place of their PENDING
        marks), head answers, and the ends decided by token alone (stop tokens, max_tokens, max_model_len); the
        blocks each sequence has computed go to the prefix cache. A sequence that ends here while the next step,
        launched ahead, computes one more token for it gives that token back (its mark, and its KV as computed).
        Returns the sequences that got a token or an answer, with the token."""
        step = self._inflight.popleft()
        tokens = step.results()
        now_s = time.perf_counter()
        # Device time: it may have waited for the last step, and a step launched ahead did its one-off work inside it.
        elapsed = max(now_s - max(step.started, self._collected_at) + step.carried_s, 0.0)
        self._collected_at = now_s
        seqs = step.seqs
        self._observe(step, elapsed)
        answers = self._answer_heads(seqs, tokens)
        now = self.clock()
        kept = []
        for seq, pos, token, stop in zip(seqs, step.outputs, tokens, step.stop_ids):
            if seq.finished:  # aborted while this step ran (a stop string, say): drop its token
                continue
            if pos is None and seq not in answers:  # a chunk of its prompt
                self.blocks.cache_blocks(seq)
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq in answers:  # answered by its head: done after the prefill
                seq.head_output = answers[seq]
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "stop"
                token = None
            else:
                seq.output_ids[pos] = token
                self.num_generation_tokens += 1
                self._check_stop_token(seq, token, stop, pos + 1)
                extra = len(seq.output_ids) - pos - 1  # the next step's mark, when it was launched ahead
                if seq.finished and extra:
                    del seq.output_ids[pos + 1 :]
                    seq.num_computed -= extra
            self.blocks.cache_blocks(seq)
            if seq.finished:
                self.scheduler.remove(seq)
                del self.requests[seq.request_id]
            kept.append((seq, token))
        return kept

    def _observe(self, step: InFlight, elapsed: float) -> None:
        """The collected step's record (before its sequences advance): counted per mode, priced by the policy's
        cost model before the policy learns from it (with LoRA), logged."""
        seqs = step.seqs
        mode = step_mode(step.hot, (s.lora_name for s in seqs))
        tokens: dict[str | None, int] = {}
        attention = 0
        for s, start, n in zip(seqs, step.starts, step.num_tokens):
            tokens[s.lora_name] = tokens.get(s.lora_name, 0) + n
            attention += n * (start + n)
        nbytes = {a: self._adapter_bytes(a) for a in {*tokens, step.hot} if a is not None}
        run = step.run
        record = StepRecord(mode.value, step.hot, len(seqs), sum(tokens.values()), elapsed, step.switch_s,
                            step.merged_bytes, StepWork(tokens, len(seqs), step.hot, nbytes, run.image_tokens,
                                                        step.slot_load_bytes, attention),
                            run.graph, run.decode, run.capture_s, costs=step.costs, time=time.time())
        record.gc_s, record.compile_s, record.alloc_retries = self.pauses.take(step.pause_mark, elapsed)
        record.launch_s, record.outside_s = step.launch_s, self._outside_s - step.outside_mark
        if self.step_log is not None:
            self._unlogged.append(record)
        if self.policy is None:
            return
        self.last_mode = mode
        self.mode_steps[mode.value] += 1
        self.mode_seconds[mode.value] += elapsed
        record.predicted_s = self.policy.predict(record)
        if record.predicted_s is not None:
            self.step_costs[mode.value].add(record.predicted_s, record.compute_s)
        self.policy.observe(record)

    def _answer_heads(self, seqs: list[Sequence], results: list) -> dict[Sequence, HeadOutput]:
        """Head answers for the sequences that asked for one and finished their prompt (their step result is their
        last hidden state)."""
        asked = [(s, r) for s, r in zip(seqs, results) if isinstance(s.params, HeadParams) and r is not None]
        if not asked:
            return {}
        answers = answer_all([(self.heads[s.lora_name].heads[s.params.head], r) for s, r in asked])
        return {s: a for (s, _), a in zip(asked, answers)}

    def _check_stop_token(self, seq: Sequence, token: int, stops: set[int], count: int) -> None:
        """Ends decided by the token alone, the `count`-th of its output (a structured output also ends when its
        grammar is complete)."""
        p = seq.params
        reason: str | None = None
        if seq.grammar is not None and not seq.grammar.consume_token(token) and token not in stops:
            logger.warning("request %s: token %d broke its grammar (%s); ending it", seq.request_id, token,
                           seq.grammar.get_error())
            reason = "abort"
        elif token in stops:  # the sampler masks stop tokens until min_tokens is reached
            reason, seq.stop_reason = "stop", (token if token in p.stop_token_ids else None)
        elif seq.grammar is not None and seq.grammar.is_stopped():
            reason = "stop"
        elif p.max_tokens is not None and count >= p.max_tokens or seq.prompt_len + count >= self.max_model_len:
            reason = "length"
        if reason is not None:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    @staticmethod
    def _output(seq: Sequence, token: int | None) -> EngineCoreOutput:
        """What the collected step did to `seq`: its new token (or its head's answer) and its end, if any."""
        new = [] if token is None else [token]
        logprobs = seq.logprobs[-1:] if seq.logprobs and new else None
        return EngineCoreOutput(seq.request_id, new, logprobs, seq.finish_reason, seq.stop_reason, seq.head_output,
                                seq.first_scheduled_time, seq.first_token_time, seq.num_cached_tokens)
