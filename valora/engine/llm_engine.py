"""`LLMEngine`: requests in (`add_request`), one continuous-batching step at a time (`step`), results out.

It owns the model, the paged KV cache, the adapter manager and the scheduler. A request that cannot be
served (bad prompt, image or adapter) is refused in `add_request` with an error that names the problem, and
everything already accepted keeps running.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from valora.config import EngineConfig, resolve_device, resolve_dtype
from valora.engine.block_manager import BlockManager
from valora.engine.detokenizer import IncrementalDetokenizer
from valora.engine.model_runner import ModelRunner
from valora.engine.scheduler import Scheduler
from valora.engine.sequence import Sequence, SequenceStatus
from valora.lora.manager import LoRAManager
from valora.lora.request import LoRARequest
from valora.models.loader import iter_checkpoint
from valora.models.registry import resolve_family
from valora.multimodal.inputs import InputError, ProcessedPrompt, load_image
from valora.outputs import CompletionOutput, RequestMetrics, RequestOutput
from valora.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


@dataclass
class Request:
    request_id: str
    prompt: str | None
    processed: ProcessedPrompt
    params: SamplingParams
    lora_name: str | None
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    new_text: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


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
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        model_dir = Path(config.model)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.family = resolve_family(self.hf_config)
        text_cfg = getattr(self.hf_config, "text_config", self.hf_config)
        ckpt_dtype = getattr(text_cfg, "dtype", None) or getattr(self.hf_config, "dtype", None)
        if isinstance(ckpt_dtype, str):
            ckpt_dtype = getattr(torch, ckpt_dtype, None)
        self.dtype = resolve_dtype(config.dtype, ckpt_dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        self.processor = self.family.processor_cls(model_dir, self.hf_config, self.tokenizer)
        self.model = self._load_model(model_dir)
        self.lora_manager = None
        if config.enable_lora:
            self.lora_manager = LoRAManager(self.model, self.model.mapper, config.lora, self.dtype, self.device)
        self.eos_token_ids = self._eos_ids(model_dir)
        self.max_model_len = config.max_model_len or getattr(text_cfg, "max_position_embeddings", 4096)
        sc = config.scheduler
        self.max_batched_tokens = sc.max_num_batched_tokens or max(self.max_model_len, 2048)
        blocks = BlockManager(self._num_kv_blocks(), config.cache.block_size)
        capacity = blocks.num_blocks * blocks.block_size
        if capacity < self.max_model_len:
            logger.warning("KV cache holds %d tokens; lowering max_model_len from %d", capacity, self.max_model_len)
            self.max_model_len = capacity
        self.max_batched_tokens = max(self.max_batched_tokens, self.max_model_len, sc.max_num_seqs)
        self.blocks = blocks
        self.runner = ModelRunner(self.model, blocks, self.dtype, self.device)
        self.scheduler = Scheduler(sc, blocks, self.max_batched_tokens,
                                   config.lora.max_loras if config.enable_lora else None)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        logger.info(
            "engine ready: %s (%s) on %s in %s, KV cache %d blocks x %d tokens, max_model_len %d",
            model_dir.name, self.family.name, self.device, str(self.dtype).removeprefix("torch."),
            blocks.num_blocks, blocks.block_size, self.max_model_len,
        )

    # -- start-up -------------------------------------------------------------------------------------------
    def _load_model(self, model_dir: Path) -> torch.nn.Module:
        t0 = time.perf_counter()
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = self.family.model_cls(self.hf_config)
        finally:
            torch.set_default_dtype(default)
        model.load_weights(iter_checkpoint(model_dir))
        model.eval()
        logger.info("loaded %s weights in %.1f s", model_dir.name, time.perf_counter() - t0)
        return model

    def _eos_ids(self, model_dir: Path) -> set[int]:
        ids: set[int] = set()
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:
            eos = None
        for e in eos if isinstance(eos, list) else [eos]:
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _num_kv_blocks(self) -> int:
        cc = self.config.cache
        per_block = ModelRunner.kv_bytes_per_block(self.model, cc.block_size, self.dtype)
        if cc.num_blocks is not None:
            return cc.num_blocks
        if self.device.type == "cuda":
            return self._profile_kv_blocks(per_block)
        return max(1, int(cc.cpu_kv_cache_gb * 2**30) // per_block)

    def _profile_kv_blocks(self, per_block: int) -> int:
        """Run the largest step once on a scratch cache; what the peak leaves under the target is KV cache."""
        cc = self.config.cache
        tokens = min(self.max_batched_tokens, self.max_model_len)
        scratch = BlockManager(-(-tokens // cc.block_size), cc.block_size)
        runner = ModelRunner(self.model, scratch, self.dtype, self.device)
        seq = Sequence(-1, "profile", 0, ProcessedPrompt([0] * tokens), SamplingParams(temperature=0), None, 0.0)
        scratch.grow(seq)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        runner.run([seq], {}, [set()])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del runner, scratch
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
        if self.lora_manager is None:
            raise InputError("LoRA is disabled; start the engine with enable_lora=True")
        self.lora_manager.register(lora_request)

    def remove_lora(self, name: str) -> None:
        if self.lora_manager is None:
            raise InputError("LoRA is disabled")
        if any(r.lora_name == name and not r.finished for r in self.requests.values()):
            raise InputError(f"adapter {name!r} is in use by running requests")
        self.lora_manager.unregister(name)

    def list_loras(self) -> list[str]:
        return self.lora_manager.names if self.lora_manager else []

    # -- requests -------------------------------------------------------------------------------------------
    def process_prompt(self, prompt: PromptType) -> tuple[str | None, ProcessedPrompt]:
        images: list = []
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if (text is None) == (ids is None):
                raise InputError("a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids'")
            mm = prompt.get("multi_modal_data") or {}
            unknown = set(mm) - {"image"}
            if unknown:
                raise InputError(f"unsupported multi_modal_data keys {sorted(unknown)} (only 'image')")
            raw = mm.get("image", [])
            images = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        else:
            raise InputError(f"prompt must be a string or a dict, not {type(prompt).__name__}")
        limits = self.config.multimodal
        if len(images) > limits.max_images_per_prompt:
            raise InputError(f"{len(images)} images in one prompt, over the limit of {limits.max_images_per_prompt}")
        images = [load_image(img, limits) for img in images]
        if ids is not None:
            vocab = self.model.decoder_config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise InputError(f"prompt_token_ids must be integers in [0, {vocab})")
        processed = self.processor(text if ids is None else ids, images)
        n = len(processed.token_ids)
        if n == 0:
            raise InputError("prompt is empty")
        if n >= self.max_model_len:
            raise InputError(f"prompt has {n} tokens but the context length (max_model_len) is {self.max_model_len}")
        return text, processed

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        lora_name = None
        if lora_request is not None:
            self.add_lora(lora_request)
            lora_name = lora_request.lora_name
        text, processed = self.process_prompt(prompt)
        now = arrival_time if arrival_time is not None else time.time()
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seqs.append(Sequence(next(self._seq_ids), request_id, i, processed, params, lora_name, now, gen))
        detoks = [IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) for _ in seqs]
        self.requests[request_id] = Request(request_id, text, processed, params, lora_name, seqs, detoks,
                                            RequestMetrics(arrival_time=now))
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.finished:
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
            num_preemptions=sched.num_preemptions,
        )

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step -------------------------------------------------------------------------------------------
    def _stop_ids(self, seq: Sequence) -> set[int]:
        ids = set(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        names = {s.lora_name for s in sched.seqs if s.lora_name is not None}
        slots = self.lora_manager.activate(names) if names else {}
        stop_ids = [self._stop_ids(s) for s in sched.seqs]
        tokens = self.runner.run(sched.seqs, slots, stop_ids)
        now = time.time()
        touched: dict[str, Request] = {}
        for seq, token, stops in zip(sched.seqs, tokens, stop_ids):
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            seq.num_computed = len(seq)
            seq.output_ids.append(token)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            self._check_stop(seq, req, token, stops)
            if seq.finished:
                self.scheduler.remove(seq)
            touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                req.metrics.finished_time = now
                del self.requests[req.request_id]
        return outputs

    def _check_stop(self, seq: Sequence, req: Request, token: int, stops: set[int]) -> None:
        p = seq.params
        detok = req.detoks[seq.index]
        reason: str | None = None
        if token in stops:  # the sampler masks stop tokens until min_tokens is reached
            reason, seq.stop_reason = "stop", (token if token in p.stop_token_ids else None)
        elif p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        prev = len(seq.output_text)
        seq.output_text += detok.step(seq.output_ids, final=reason is not None)
        if p.stop and len(seq.output_ids) >= p.min_tokens:
            longest = max(len(s) for s in p.stop)
            window_start = max(0, prev - longest + 1)
            hits = [(seq.output_text.find(s, window_start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.output_text = seq.output_text[: i + len(s) if p.include_stop_str_in_output else i]
                reason, seq.stop_reason = "stop", s
        if reason is not None:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _output(self, req: Request) -> RequestOutput:
        completions = [
            CompletionOutput(s.index, s.output_text, list(s.output_ids), s.finish_reason, s.stop_reason,
                             list(s.logprobs) if s.logprobs is not None else None)
            for s in req.seqs
        ]
        return RequestOutput(req.request_id, req.prompt, list(req.processed.token_ids), completions, req.finished,
                             req.lora_name, req.metrics)
