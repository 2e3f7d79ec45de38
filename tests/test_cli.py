"""Acceptance 1 of issue 22: every subcommand given each bad input a user tries prints one line on stderr that
says what is wrong (no traceback) and exits 2, before any model loads; `--log-level` works after the subcommand;
Ctrl-C on `valora serve` exits quietly."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from valora.cli import main
from valora.server.launch import free_port

pytestmark = pytest.mark.families("qwen2_vl")


@pytest.fixture(autouse=True)
def _keep_logging():
    """`main` configures the root logger; give the next test back the one it had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _cases(model, adapter, tmp, busy_port):
    down = f"http://127.0.0.1:{free_port()}"
    typo = tmp / "typo.yaml"
    typo.write_text("workloads:\n  - name: vqa\n    rates: [1]\n    duraton_s: 5\nserver: {base_url: http://x}\n")
    no_cuda = [] if torch.cuda.is_available() else [
        (["serve", model, "--device", "cuda"], "CUDA is not available"),
        (["generate", model, "--prompt", "hi", "--device", "cuda"], "CUDA is not available"),
        (["tune-kernels"], "needs a CUDA GPU"),
    ]
    return [
        *no_cuda,
        (["serve", model, "--port", "99999"], "invalid port"),
        (["serve", model, "--port", str(busy_port)], "cannot listen"),
        (["serve", model, "--max-model-len", "100000"], "over the 4096 positions"),
        (["serve", model, "--lora-backend", "foo"], "unknown LoRA backend"),
        (["serve", model, "--tokenizer", "/nonexistent"], "not a tokenizer directory"),
        (["serve", model, "--lora-modules", "a=/nonexistent"], "directory not found"),
        (["serve", model, "--lora-modules", f"a={model}"], "no adapter_config.json"),
        (["serve", model, "--lora-root", "/nonexistent"], "not a directory"),
        (["serve", model, "--dtype", "float8"], "unknown dtype"),
        (["serve", model, "--encoder-in-token-budget", "--no-enable-chunked-prefill"], "needs chunked prefill"),
        (["serve", model, "--scheduler", "fifo"], "invalid choice"),
        (["serve", str(tmp / "nowhere")], "does not exist"),
        (["serve", str(tmp)], "no config.json"),
        (["serve", adapter], "is a LoRA adapter"),
        (["generate", adapter, "--prompt", "hi"], "is a LoRA adapter"),
        (["serve"], "required: model"),
        (["serve", model, "--log-level", "LOUD"], "invalid level"),
        (["generate", model, "--prompt", "hi", "--image", "/nonexistent.png"], "no such file"),
        (["generate", model, "--prompt", "hi", "--video", "/nonexistent.mp4"], "--video /nonexistent.mp4: no such"),
        (["generate", model, "--prompt", "hi", "--lora", f"a={adapter}", "--max-model-len", "0"], "positive"),
        (["generate", model, "--prompt", "hi", "--lora", "a=/nonexistent"], "directory not found"),
        (["generate", model, "--prompt", "hi", "--lora", "a"], "NAME=PATH"),
        (["generate", str(tmp / "nowhere"), "--prompt", "hi"], "does not exist"),
        (["bench", "run", "--base-url", down, "--out", str(tmp / "r")], "cannot reach the server"),
        (["bench", "sweep", str(typo), "--out", str(tmp / "s")], "unknown field(s) duraton_s"),
        (["bench", "sweep", str(tmp / "missing.yaml")], "cannot read"),
        (["bench", "report", str(tmp / "nowhere")], "not a results directory"),
        (["bench"], "required: SUBCOMMAND"),
        (["adapters", "build", str(tmp / "missing.yaml"), "--base", model, "--out", str(tmp / "a")], "cannot read"),
        (["adapters", "build", "embedded", "--base", str(tmp / "nowhere"), "--out", str(tmp / "a")],
         "not a model directory"),
        (["demo", "--port", "-1"], "invalid port"),
        (["frobnicate"], "invalid choice"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(tiny_model, adapter_factory, tmp_path, busy_port, capfd):
    adapter = adapter_factory(tiny_model, r=4)
    cases = _cases(str(tiny_model), str(adapter), tmp_path, busy_port)
    capfd.readouterr()  # what building the adapter printed
    for argv, expected in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out, err = capfd.readouterr()
        lines = err.strip().splitlines()
        assert code == 2, (argv, code, err)
        assert len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert expected in lines[0] and lines[0].startswith("valora"), (argv, lines[0])
        assert not (tmp_path / "r").exists()  # nothing written for a run that could not start


def test_log_level_after_the_subcommand_shows_the_traceback(tiny_model, capfd):
    assert main(["serve", str(tiny_model), "--max-model-len", "100000", "--log-level", "debug"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("valora serve: error:")


def test_version(capfd):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capfd.readouterr().out.startswith("valora ")


def test_ctrl_c_on_serve_exits_quietly(tiny_model, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "valora.cli", "serve", str(tiny_model), "--device", "cpu",
                             "--port", str(port), "--num-kv-blocks", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err and "serving on http://127.0.0.1" in err and "Shutting down" in err


def test_generate_with_a_video(tiny_model, tmp_path, capfd):
    from valora.multimodal.video import encode_video
    from valora.testing.images import random_image

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_video([random_image(56, 84, seed=i) for i in range(4)], fps=2))
    code = main(["generate", str(tiny_model), "--prompt", "what happens ?", "--video", str(clip), "--device", "cpu",
                 "--max-tokens", "3"])
    assert code == 0 and capfd.readouterr().out.endswith("\n")  # the answer's line (a random model's may be blank)
