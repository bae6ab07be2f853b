"""A tuning job killed mid-run resumes from its checkpoint to the same adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import make_tokenizer, tiny_model

from offsite.bundle import load_adapter
from offsite.cli import main


def test_killed_tune_resumes_to_the_same_adapter(tmp_path):
    model = tiny_model("llama", 6)
    model.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question: {i} times two?\nAnswer:", "completion": f" {2 * i}"})
                            + "\n" for i in range(64)))
    assert main(["emulate", "--model", str(tmp_path / "model"), "--keep", "1", "--out", str(tmp_path / "emu")]) == 0
    args = ["tune", "--emulator", str(tmp_path / "emu"), "--data", str(data), "--max-steps", "40",
            "--batch-size", "4", "--checkpoint-every", "1", "--eval-every", "10", "--lr", "1e-3"]

    assert main(args + ["--out", str(tmp_path / "straight")]) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "offsite.cli", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed.work" / "checkpoint" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip().split("-")[-1]) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed job must not leave a bundle"

    assert main(args + ["--out", str(out)]) == 0  # the same command resumes
    a, b = load_adapter(tmp_path / "straight"), load_adapter(out)
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], rtol=0, atol=1e-7)
    assert not (tmp_path / "killed.work").exists()
