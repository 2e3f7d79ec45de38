"""Serving throughput on the CPU (issue 16, acceptance 1): `valora serve` with the tiny Qwen2-VL, 64 concurrent
streamed chat requests of 8 output tokens each, text-only and with one 448x448 JPEG each; requests per second.

    python -m benchmarks.serve_throughput                   # this checkout and commit 34a1cbf, 3 rounds each
    python -m benchmarks.serve_throughput --quick           # one round each, 16 requests (checks the script)
    python -m benchmarks.serve_throughput --baseline none   # this checkout only

The baseline runs from a `git worktree` of its commit (under --work-dir), served with PYTHONPATH and the working
directory pointing at it, so both servers load the same model with the same flags in the same run. Every request
carries a different image (real photos and digits from `valora.bench.images`), so no image cache can hit. A round
sends all requests at once and ends when the last stream ends; the result is the median round. The client runs
on the same machine and costs both servers alike, so it is kept lean: aiohttp (as `vllm bench serve`), bodies
encoded before the round, each stream read in chunks and checked for errors without being parsed; httpx cost
10-13 ms of CPU per streamed request here, more than the server itself, and capped what the box could show.
The client's CPU per request is reported beside the server's. Results: benchmarks/results/serve_throughput_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import time
from pathlib import Path

import aiohttp

from benchmarks.common import write_result
from valora.bench.images import ImageRef, data_url
from valora.bench.server import ServeProcess

REPO = Path(__file__).resolve().parents[1]
BASELINE = "34a1cbf"
SERVED = "tiny"
logger = logging.getLogger("serve_throughput")


def tiny_model(work: Path) -> Path:
    """The tests' tiny Qwen2-VL (`initializer_range=0.05`), built once under `work`."""
    from valora.testing.checkpoints import build_model

    path = work / "tiny-qwen2-vl"
    if not (path / "config.json").exists():
        build_model("qwen2_vl", path, initializer_range=0.05)
    return path


def checkout(commit: str, work: Path) -> Path:
    """A detached worktree of `commit` (kept for later runs)."""
    path = work / f"valora-{commit}"
    if not (path / "valora").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                       capture_output=True)
    return path


def bodies(n: int, round_: int, image: bool, max_tokens: int) -> list[bytes]:
    """`n` chat requests, pre-encoded; image i of round r is its own crop (never the same bytes twice)."""
    out = []
    for i in range(n):
        content: list[dict] = [{"type": "text", "text": f"Describe picture {i} of round {round_}."}]
        if image:
            url = data_url(ImageRef(picture=i, frame=round_, size=(448, 448)))
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        out.append(json.dumps({
            "model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
        }).encode())
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its descendants so far."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def one_round(session: aiohttp.ClientSession, url: str, reqs: list[bytes], pid: int) -> dict[str, float]:
    """Requests per second for all of `reqs` sent at once, each streamed to its end, and the server's and the
    client's CPU milliseconds per request (figures that busy neighbours on the machine disturb less)."""

    async def one(body: bytes) -> None:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:300]!r}")
            async for chunk in r.content.iter_any():
                if b'data: {"error"' in chunk:
                    raise RuntimeError(chunk[:300].decode(errors="replace"))

    cpu0, own0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(b) for b in reqs))
    wall = time.perf_counter() - t0
    return {"req_per_s": len(reqs) / wall, "server_cpu_ms": 1e3 * (cpu_seconds(pid) - cpu0) / len(reqs),
            "client_cpu_ms": 1e3 * (time.process_time() - own0) / len(reqs)}


def measure(url: str, pid: int, concurrency: int, rounds: int, max_tokens: int) -> dict:
    async def run() -> dict:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
            endpoint = f"{url}/v1/chat/completions"
            out = {}
            for kind, image in (("text", False), ("image", True)):
                await one_round(session, endpoint, bodies(concurrency, 10_000, image, max_tokens), pid)  # warm-up
                rounds_ = [await one_round(session, endpoint, bodies(concurrency, r, image, max_tokens), pid)
                           for r in range(rounds)]
                rates = [r["req_per_s"] for r in rounds_]
                out[kind] = {"req_per_s": statistics.median(rates),
                             "server_cpu_ms_per_req": statistics.median(r["server_cpu_ms"] for r in rounds_),
                             "client_cpu_ms_per_req": statistics.median(r["client_cpu_ms"] for r in rounds_),
                             "rounds": rates, "rounds_cpu_ms_per_req": [r["server_cpu_ms"] for r in rounds_]}
                logger.info("%s %s: %.1f req/s, %.1f server / %.1f client CPU ms/req %s", url, kind,
                            out[kind]["req_per_s"], out[kind]["server_cpu_ms_per_req"],
                            out[kind]["client_cpu_ms_per_req"], [round(x, 1) for x in rates])
            return out

    return asyncio.run(run())


def serve_and_measure(name: str, tree: Path, model: Path, args: argparse.Namespace) -> dict:
    env = {"PYTHONPATH": str(tree)}
    log = args.work_dir / f"serve-{name}.log"
    server = ServeProcess(model, ["--served-model-name", SERVED, "--device", "cpu", *args.serve_args], log,
                          env=env, cwd=tree)
    with server:
        result = measure(server.url, server.proc.pid, args.concurrency, args.rounds, args.max_tokens)
    return {"tree": str(tree), **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help=f"commit to compare with, or 'none' (default: {BASELINE})")
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "valora-serve-bench")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="16 requests, one round: checks that the script works")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                   help="further `valora serve` flags for both servers (last on the command line)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.concurrency, args.rounds = 16, 1
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_model(args.work_dir)
    runs = {"this": serve_and_measure("this", REPO, model, args)}
    if args.baseline != "none":
        runs[args.baseline] = serve_and_measure(args.baseline, checkout(args.baseline, args.work_dir), model, args)
    payload = {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "image": "448x448 JPEG (quality 90), a different one per request", "runs": runs}
    this = runs["this"]
    payload["image_over_text"] = this["image"]["req_per_s"] / this["text"]["req_per_s"]
    if args.baseline != "none":
        base = runs[args.baseline]
        payload["vs_baseline"] = {k: this[k]["req_per_s"] / base[k]["req_per_s"] for k in ("text", "image")}
    path = write_result("serve_throughput_cpu", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "runs"} | {
        name: {k: (round(r[k]["req_per_s"], 1), round(r[k]["server_cpu_ms_per_req"], 1)) for k in ("text", "image")}
        for name, r in runs.items()}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
