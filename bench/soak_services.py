"""Soak both HTTP services on loopback: many concurrent requests, valid and hostile, and the server
still up at the end.

The script builds a tiny random LLaMA (8 blocks, hidden size 32) and its emulator bundle in a temp
folder, starts the owner's two services on it as separate processes on 127.0.0.1 (``offsite
assist-serve`` with five API keys, ``offsite serve``), and sends ``--requests`` requests (half to
each) with ``--concurrency`` in flight, each of a kind drawn with a seeded generator:

* assist-serve: ``valid`` (the bottom adapter tensors; 200, or 429 once that key's budget or rate is
  spent, or 503 while 8 requests are already held for the model), ``info``, ``bad_dtype`` (int32), ``bad_shape``, ``huge_value`` (3e38), ``not_safetensors``,
  ``no_key`` (401), ``wrong_path`` (404), ``wrong_method`` (405), ``oversized`` (a Content-Length
  over the body limit: 413), ``slow_body`` (a byte every 0.4 s: 408 and the connection closed after
  the services' ``--body-timeout``, 5 s here), ``silent`` (a connection that sends nothing: closed
  without an answer after as long);
* serve (PEMA): ``forward``, ``greedy`` (200, or 503 while busy), ``bad_json``, ``bad_types`` (400), ``too_many``
  (413, max_batch), ``reply_over_cap`` (413, its computed reply size), and the same ``wrong_path``,
  ``wrong_method``, ``oversized``, ``slow_body`` and ``silent``.

A request whose status is not one its kind expects, a 5xx, an error body that is not one-line JSON
``{"error"}``, or a connection the server dropped without an answer counts as ``unexpected``. It
records requests, statuses per kind, latency (p50, p99), each server's peak resident memory
(``VmHWM``) and whether each server still answers at the end; bounded by ``--requests`` and
``--max-seconds``.

    python bench/soak_services.py [--requests 2400] [--concurrency 50] [--seed 0]

Writes bench/results/soak-services.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "soak-services.json"
KEYS = [f"key-{i}" for i in range(5)]
BODY_TIMEOUT = 5.0
MAX_BODY_MB = 0.25
EXPECT = {
    "assist": {"valid": {200, 429, 503}, "info": {200}, "bad_dtype": {400}, "bad_shape": {400}, "huge_value": {400},
               "not_safetensors": {400}, "no_key": {401}, "wrong_path": {404}, "wrong_method": {405},
               "oversized": {413}, "slow_body": {408}, "silent": {"closed"}},
    "pema": {"forward": {200, 503}, "greedy": {200, 503}, "bad_json": {400}, "bad_types": {400}, "too_many": {413},
             "reply_over_cap": {413}, "wrong_path": {404}, "wrong_method": {405}, "oversized": {413},
             "slow_body": {408}, "silent": {"closed"}},
}
WEIGHTS = {"valid": 6, "info": 2, "forward": 6, "greedy": 3, "slow_body": 0.5, "oversized": 0.5, "silent": 0.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: Path) -> tuple[Path, Path, dict]:
    """A tiny model folder, its emulator bundle, and the request bodies the soak sends."""
    import torch

    from offsite import adapters
    from offsite.assist import tensors_to_bytes
    from offsite.bundle import save_emulator
    from offsite.emulator import build_emulator
    from offsite.testing import make_tokenizer, tiny_model

    model, tok = tiny_model("llama", 8), make_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    emu = build_emulator("uniform", model, tok, "tiny", "2,2", keep=2)
    save_emulator(emu, root / "emu")
    state = adapters.extract(emu.model, emu.adapter_positions, "full")
    bottom = sorted({int(k.split(".")[1]) for k in state})[:2]
    good = {k: v for k, v in state.items() if int(k.split(".")[1]) in bottom}
    name = sorted(good)[0]
    huge = good[name].clone()
    huge.view(-1)[0] = 3e38
    bodies = {"valid": tensors_to_bytes(good), "bad_dtype": tensors_to_bytes({**good, name: good[name].to(torch.int32)}),
              "bad_shape": tensors_to_bytes({**good, name: torch.zeros(3, 3)}),
              "huge_value": tensors_to_bytes({**good, name: huge}), "not_safetensors": b"\x80\x04pickle" * 10}
    return root / "model", root / "emu", bodies


def start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from offsite.cli import main; sys.exit(main(sys.argv[1:]))", *args,
           "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 600) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited ({proc.returncode})")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server at {url} did not start")


def peak_rss_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            fields[k] = round(int(v.split()[0]) / 1024, 1)
    return fields


async def raw(port: int, head: bytes, trickle: bool, limit: float) -> tuple[int | str | None, bytes]:
    """Send ``head`` on a fresh connection (then, with ``trickle``, a body byte every 0.4 s) and read
    until the server closes: (status, response bytes); status "closed" when it closed without an
    answer, None when it still held the connection after ``limit`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        writer.write(head)
        await writer.drain()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if trickle:
                try:
                    writer.write(b"x")
                    await writer.drain()
                except OSError:
                    pass
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.4)
            except asyncio.TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        else:
            return None, got  # the server kept the connection: held open
    finally:
        writer.close()
    if not got:
        return "closed", got
    try:
        return int(got.split(b" ", 2)[1]), got
    except (IndexError, ValueError):
        return None, got


def one_line_error(body: bytes) -> bool:
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {"error"} and isinstance(obj["error"], str) and "\n" not in obj["error"]


async def _raw_request(port: int, service: str, kind: str, key: str):
    """The requests an HTTP client cannot send: silence, a body that trickles in, one over the cap."""
    if kind == "silent":
        return await raw(port, b"", False, BODY_TIMEOUT + 8)
    path = "/v1/correction" if service == "assist" else "/v1/forward"
    length = 1000 if kind == "slow_body" else int(MAX_BODY_MB * (1 << 20)) * 4
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            + (f"X-API-Key: {key}\r\n" if service == "assist" else "") + "\r\n").encode()
    status, got = await raw(port, head, kind == "slow_body", BODY_TIMEOUT + 8)
    return status, got.partition(b"\r\n\r\n")[2]


async def _assist_request(http, url: str, kind: str, key: str, bodies: dict):
    hdr = {"X-API-Key": key}
    if kind == "info":
        return await http.get(url + "/v1/info", headers=hdr)
    if kind == "wrong_path":
        return await http.get(url + "/v1/nothing", headers=hdr)
    if kind == "wrong_method":
        return await http.get(url + "/v1/correction", headers=hdr)
    return await http.post(url + "/v1/correction", content=bodies["not_safetensors" if kind == "no_key" else kind],
                           headers={} if kind == "no_key" else hdr)


async def _pema_request(http, url: str, kind: str, rng: random.Random):
    # drawn for every kind, in this order, so that a seed gives the same requests as before
    seqs = [[rng.randrange(256) for _ in range(rng.randint(2, 20))] for _ in range(rng.randint(1, 4))]
    steps = rng.randint(1, 8)
    if kind == "bad_json":
        return await http.post(url + "/v1/forward", content=b'{"sequences": [[1, 2]')
    if kind == "wrong_path":
        return await http.post(url + "/v2/forward", json={})
    if kind == "wrong_method":
        return await http.delete(url + "/v1/forward")
    path, body = {"forward": ("/v1/forward", {"sequences": seqs}),
                  "greedy": ("/v1/greedy", {"prompts": seqs, "steps": steps}),
                  "bad_types": ("/v1/forward", {"sequences": [["a", 1.5]]}),
                  "too_many": ("/v1/forward", {"sequences": [[1]] * 9}),
                  "reply_over_cap": ("/v1/forward", {"sequences": [[1] * 400] * 8, "logprobs": False})}[kind]
    return await http.post(url + path, json=body)


async def soak(args, ports: dict, bodies: dict) -> tuple[list[dict], float]:
    import httpx

    rng = random.Random(args.seed)
    plan = []
    for i in range(args.requests):
        service = "assist" if i % 2 == 0 else "pema"
        kinds = sorted(EXPECT[service])
        plan.append((service, rng.choices(kinds, [WEIGHTS.get(k, 1) for k in kinds])[0], rng.choice(KEYS)))
    sem = asyncio.Semaphore(args.concurrency)
    records: list[dict] = []
    t_end = time.monotonic() + args.max_seconds
    # idle connections dropped before the server's 5 s keep-alive closes them (as offsite.service.ServiceClient)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(service, kind, key):
            if time.monotonic() > t_end:
                return
            url = f"http://127.0.0.1:{ports[service]}"
            async with sem:
                t0 = time.monotonic()
                status, body = None, b""
                try:
                    if kind in ("silent", "slow_body", "oversized"):
                        status, body = await _raw_request(ports[service], service, kind, key)
                    else:
                        r = await (_assist_request(http, url, kind, key, bodies) if service == "assist"
                                   else _pema_request(http, url, kind, rng))
                        status, body = r.status_code, r.content
                except (httpx.HTTPError, OSError) as e:
                    body = f"{type(e).__name__}".encode()
                ms = (time.monotonic() - t0) * 1000
            ok = status in EXPECT[service][kind] and (status in (200, "closed") or one_line_error(body))
            records.append({"service": service, "kind": kind, "status": status, "ms": ms, "ok": ok,
                            **({} if ok else {"body": body[:200].decode("utf-8", "replace")})})

        t0 = time.monotonic()
        await asyncio.gather(*(one(*p) for p in plan))
    return records, time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 1) if v else float("nan")


def summary(records: list[dict]) -> dict:
    out = {"requests": len(records), "unexpected": sum(not r["ok"] for r in records),
           "p50_ms": pct([r["ms"] for r in records], 0.5), "p99_ms": pct([r["ms"] for r in records], 0.99),
           "by_kind": {}}
    for r in records:
        k = out["by_kind"].setdefault(r["kind"], {"statuses": {}, "ms": []})
        k["statuses"][str(r["status"])] = k["statuses"].get(str(r["status"]), 0) + 1
        k["ms"].append(r["ms"])
    for k in out["by_kind"].values():
        ms = k.pop("ms")
        k.update(p50_ms=pct(ms, 0.5), p99_ms=pct(ms, 0.99))
    fast = [r["ms"] for r in records if r["kind"] not in ("slow_body", "silent")]
    out.update(p50_ms_without_slow_and_silent=pct(fast, 0.5), p99_ms_without_slow_and_silent=pct(fast, 0.99))
    bad = [r for r in records if not r["ok"]]
    if bad:
        out["unexpected_examples"] = bad[:10]
    return out


def main(argv=None) -> int:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2400)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--max-seconds", type=float, default=480.0, help="stop sending after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    from offsite.experiment.results import meta

    info = meta(" ".join(["python", "bench/soak_services.py", *(argv if argv is not None else sys.argv[1:])]))
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model, emu, bodies = build(root)
        ports = {"assist": free_port(), "pema": free_port()}
        common = ["--max-body-mb", str(MAX_BODY_MB), "--body-timeout", str(BODY_TIMEOUT)]
        procs = {
            "assist": start(["assist-serve", "--model", str(model), "--emulator", str(emu), "--assist-examples", "8",
                             "--per-minute", "120", *sum((["--api-key", k] for k in KEYS), []), *common],
                            ports["assist"], root / "assist.log"),
            "pema": start(["serve", "--model", str(model), "--max-batch", "8", "--max-reply-mb", "0.25", *common],
                          ports["pema"], root / "pema.log"),
        }
        try:
            for s, p in procs.items():
                wait_up(f"http://127.0.0.1:{ports[s]}", p)
            rss_start = {s: peak_rss_mb(p.pid) for s, p in procs.items()}
            records, seconds = asyncio.run(soak(args, ports, bodies))
            up = {}
            for s, p in procs.items():
                url = f"http://127.0.0.1:{ports[s]}"
                hdr = {"X-API-Key": "key-0"}
                r = (httpx.get(url + "/v1/info", headers=hdr) if s == "assist"
                     else httpx.post(url + "/v1/forward", json={"sequences": [[1, 2, 3]]}))
                up[s] = {"alive": p.poll() is None, "healthz": httpx.get(url + "/healthz").status_code,
                         "real_request": r.status_code}
            result = {
                "meta": info, "requests_planned": args.requests, "concurrency": args.concurrency,
                "seconds": round(seconds, 1), "requests_per_second": round(len(records) / seconds, 1),
                "settings": {"body_timeout_s": BODY_TIMEOUT, "max_body_mb": MAX_BODY_MB, "pema_max_reply_mb": 0.25,
                             "assist": "5 API keys, budget 32 corrections a key (the default), 120 a minute, "
                                       "8 pairs a correction from a pool of 64 WebQuestions pairs"},
                "services": {s: {**summary([r for r in records if r["service"] == s]),
                                 "memory_mb": {"start": rss_start[s], "end": peak_rss_mb(procs[s].pid)},
                                 "up_at_end": up[s]} for s in procs},
                "total": {k: v for k, v in summary(records).items() if k != "by_kind"},
            }
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
    from offsite.files import write_json_atomic

    write_json_atomic(args.out, result)
    t = result["total"]
    print(f"{t['requests']} requests in {result['seconds']} s, {t['unexpected']} unexpected, p50 {t['p50_ms']} ms, "
          f"p99 {t['p99_ms']} ms; up at end: {result['services']['assist']['up_at_end']}, "
          f"{result['services']['pema']['up_at_end']}; wrote {args.out}")
    return 0 if t["unexpected"] == 0 and all(v["alive"] for v in up.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
