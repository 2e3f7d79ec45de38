"""Seeded workloads: when each request arrives, which task and adapter it has, its prompt, images and output length.

Everything random is drawn from streams seeded by (seed, stream name), so a point is the same request list for
every policy, and two points that differ only in skew share their arrivals, tasks, prompts and images.
The original harness's skew (a fraction to adapter #1, unseeded) is kept as `hot`; `zipf` is the real thing.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from valora.bench.images import ImageRef
from valora.bench.traces import load_trace

# Filler for prompts: common words that most tokenizers (and the test models' small BPE) keep as single tokens.
_WORDS = ("the", "a", "of", "and", "in", "on", "is", "car", "red", "dog", "cat", "street", "picture", "left", "right",
          "top", "bottom", "people", "walk", "near", "building", "green", "grass", "count", "objects", "frame", "what",
          "where", "box", "scene", "describe", "number", "image", "yes", "no", "odd", "even", "tall", "runs", "parks")


@dataclass(frozen=True)
class Lengths:
    """A token count per request: `fixed`, or the trace's value times `scale`; then clipped to [min, max]."""

    fixed: int | None = None
    scale: float = 1.0
    min: int = 1
    max: int | None = None

    def draw(self, trace_values: np.ndarray) -> np.ndarray:
        v = np.full(len(trace_values), self.fixed) if self.fixed is not None else np.rint(trace_values * self.scale)
        return np.clip(v, self.min, self.max if self.max is not None else None).astype(int)


@dataclass(frozen=True)
class Task:
    """One kind of vision request. `prompt` counts the words of text besides the images; `output` is enforced
    (max_tokens = min_tokens, ignore_eos), so random-weight models answer with trace-faithful lengths."""

    name: str
    weight: float
    instruction: str
    images: int = 1
    image_size: tuple[int, int] = (448, 448)
    prompt: Lengths = field(default_factory=Lengths)
    output: Lengths = field(default_factory=Lengths)
    repeat_frame: float = 0.0  # chance that a frame is the previous frame again (a static camera)
    video: bool = False  # the frames go as one video clip (a `video_url` part), not as separate images


# Modelled on the paper (paper_notes section 4). Visual retrieval: ShareGPT-4V VQA prompts are short (the trace's
# conversation prompts scaled by 1/20) and answers are min(120, trace) tokens; RefCOCO grounding answers with a box.
# Video analytics: 200 detection requests (256 prompt tokens, 40 out, one frame) per 700 task-head requests
# (a clip of 6 frames, one answer token); a 448x448 image is 256 visual tokens on Qwen2-VL, as on Qwen-VL, and a
# clip of 6 such frames 3 x 256 (its temporal patches pair the frames).
VQA = Task("vqa", 0.5, "Answer the question about the image.", prompt=Lengths(scale=0.05, min=8, max=256),
           output=Lengths(max=120))
CAPTION = Task("caption", 0.5, "Describe the image in detail.", prompt=Lengths(fixed=12), output=Lengths(max=120))
GROUND = Task("ground", 1.0, "Give the bounding box of the object named here.", prompt=Lengths(fixed=16),
              output=Lengths(fixed=24))
DETECT = Task("detect", 2 / 9, "Detect every car and aircraft in the frame and give their boxes.",
              prompt=Lengths(fixed=256), output=Lengths(fixed=40))
ACTION = Task("action", 7 / 9, "Which action do these frames show?", images=6, prompt=Lengths(fixed=8),
              output=Lengths(fixed=1), repeat_frame=0.3, video=True)

MIXES: dict[str, tuple[Task, ...]] = {
    "vqa": (VQA, CAPTION),
    "video": (DETECT, ACTION),
    "grounding": (GROUND,),
    "retrieval": (dataclasses.replace(VQA, weight=0.35), dataclasses.replace(CAPTION, weight=0.35),
                  dataclasses.replace(GROUND, weight=0.3)),
}


@dataclass(frozen=True)
class Skew:
    """How requests pick adapters: `zipf` (P(k) ~ 1/k^alpha over the adapters in order), `hot` (a `fraction` to
    the first adapter, the rest uniform over the others), or `uniform`."""

    kind: Literal["zipf", "hot", "uniform"] = "zipf"
    alpha: float = 1.0
    fraction: float = 0.8

    @classmethod
    def parse(cls, text: str) -> Skew:
        """`zipf:1.2`, `hot:0.8` or `uniform`."""
        kind, _, value = text.partition(":")
        if kind == "zipf":
            return cls("zipf", alpha=float(value or 1.0))
        if kind == "hot":
            return cls("hot", fraction=float(value or 0.8))
        if kind == "uniform" and not value:
            return cls("uniform")
        raise ValueError(f"skew {text!r}: expected zipf:ALPHA, hot:FRACTION or uniform")

    @property
    def label(self) -> str:
        return {"zipf": f"zipf{self.alpha:g}", "hot": f"hot{self.fraction:g}", "uniform": "uniform"}[self.kind]

    def probabilities(self, n: int) -> np.ndarray:
        if self.kind == "zipf":
            p = 1.0 / np.arange(1, n + 1) ** self.alpha
        elif self.kind == "hot":
            if n == 1:
                return np.ones(1)
            p = np.r_[self.fraction, np.full(n - 1, (1 - self.fraction) / (n - 1))]
        else:
            p = np.ones(n)
        return p / p.sum()


@dataclass(frozen=True)
class Arrivals:
    """`trace`: a window of a shipped trace (or a CSV path) rescaled to the rate; `poisson`; `gamma` with
    inter-arrival coefficient of variation `cv` (burstiness: 1 is Poisson, larger is burstier)."""

    kind: Literal["trace", "poisson", "gamma"] = "trace"
    trace: str = "conv"
    cv: float = 1.0

    def times(self, n: int, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Arrival offsets of `n` requests (first at 0) and, for a trace, the trace rows they come from."""
        if self.kind == "trace":
            return load_trace(self.trace).window(n, rate, rng)
        cv = 1.0 if self.kind == "poisson" else self.cv
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
        return np.r_[0.0, np.cumsum(gaps[:-1])], None


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float
    warmup: bool  # arrives during the warm-up: sent, recorded, left out of the summary
    task: str
    adapter: str
    prompt: str
    images: tuple[ImageRef, ...]  # the images, or the frames of its video clip
    output_tokens: int
    trace_row: int  # the trace request its lengths (and, for trace arrivals, its arrival gap) come from
    video: bool = False  # `images` are the frames of one clip, sent as a video


@dataclass(frozen=True)
class Workload:
    """One point's requests: `rate` per second for `warmup_s + duration_s` seconds."""

    mix: str | tuple[Task, ...]
    rate: float
    duration_s: float
    adapters: tuple[str, ...]
    warmup_s: float = 0.0
    arrivals: Arrivals = field(default_factory=Arrivals)
    skew: Skew = field(default_factory=Skew)
    lengths_trace: str = "conv"  # where trace-based lengths come from when arrivals do not come from a trace
    pictures: int = 64  # distinct pictures the requests draw from (repeats across requests)
    image_size: tuple[int, int] | None = None  # overrides every task's image size (small models, CI)
    seed: int = 0

    @property
    def tasks(self) -> tuple[Task, ...]:
        return MIXES[self.mix] if isinstance(self.mix, str) else self.mix

    def _rng(self, stream: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(stream.encode())])

    def requests(self) -> list[Request]:
        if not self.adapters:
            raise ValueError("a workload needs at least one adapter")
        n = max(1, round(self.rate * (self.warmup_s + self.duration_s)))
        times, rows = self.arrivals.times(n, self.rate, self._rng("arrivals"))
        trace = load_trace(self.arrivals.trace if rows is not None else self.lengths_trace)
        if rows is None:
            rows = self._rng("lengths").integers(0, len(trace), size=n)
        tasks = self.tasks
        weights = np.array([t.weight for t in tasks], dtype=float)
        task_ids = self._rng("tasks").choice(len(tasks), size=n, p=weights / weights.sum())
        adapter_ids = self._rng("adapters").choice(len(self.adapters), size=n,
                                                   p=self.skew.probabilities(len(self.adapters)))
        prompt_words = {t.name: t.prompt.draw(trace.prompt_tokens[rows]) for t in tasks}
        output_tokens = {t.name: t.output.draw(trace.output_tokens[rows]) for t in tasks}
        text_rng, image_rng = self._rng("text"), self._rng("images")
        out = []
        for i in range(n):
            task = tasks[task_ids[i]]
            out.append(Request(
                index=i, arrival_s=float(times[i]), warmup=bool(times[i] < self.warmup_s), task=task.name,
                adapter=self.adapters[adapter_ids[i]], prompt=_prompt(task.instruction, prompt_words[task.name][i],
                                                                      text_rng),
                images=self._images(task, image_rng), output_tokens=int(output_tokens[task.name][i]),
                trace_row=int(rows[i]), video=task.video,
            ))
        return out

    def _images(self, task: Task, rng: np.random.Generator) -> tuple[ImageRef, ...]:
        size = tuple(self.image_size or task.image_size)
        picture = int(rng.integers(self.pictures))
        frame = int(rng.integers(1 << 16)) if task.images > 1 else 0
        refs = []
        for k in range(task.images):
            if k and rng.random() >= task.repeat_frame:
                frame += 1
            refs.append(ImageRef(picture, frame, size))
        return tuple(refs)


def _prompt(instruction: str, words: int, rng: np.random.Generator) -> str:
    """The task's instruction, padded with filler words to `words` words (never cut below the instruction)."""
    base = instruction.split()
    extra = rng.choice(len(_WORDS), size=max(0, words - len(base)))
    return " ".join([*base, *(_WORDS[j] for j in extra)])
