"""Federated offsite-tuning on Flower (tiny random models): FedAvg, SecAgg+, resume, refusal,
partitions, and both engines (simulation with Ray actors, deployment with SuperLink/SuperNodes)."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from offsite.errors import OffsiteError  # noqa: E402
from offsite.federated.core import FederationConfig, fedavg  # noqa: E402
from offsite.federated.partition import make_shards, split_indices, write_shards  # noqa: E402


# ---------------------------------------------------------------------------------------------
# aggregation and partitions (no Flower run)


def test_fedavg_of_identical_updates_is_that_update():
    rng = np.random.default_rng(0)
    u = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)]
    agg = fedavg([u, [a.copy() for a in u], [a.copy() for a in u]], [3, 100, 17])
    for a, b in zip(agg, u):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


def test_fedavg_weights_follow_example_counts():
    a = [np.full((2, 2), 1.0, np.float32)]
    b = [np.full((2, 2), 5.0, np.float32)]
    np.testing.assert_allclose(fedavg([a, b], [30, 10])[0], np.full((2, 2), 2.0))  # (30*1 + 10*5) / 40
    np.testing.assert_allclose(fedavg([a, b], [1, 3])[0], np.full((2, 2), 4.0))
    with pytest.raises(OffsiteError):
        fedavg([a, b], [0, 0])


def test_partitions_are_reproducible_and_skewed():
    labels = [i % 4 for i in range(400)]
    p1 = split_indices(labels, 4, "dirichlet", alpha=0.3, seed=7)
    assert p1 == split_indices(labels, 4, "dirichlet", alpha=0.3, seed=7)
    assert p1 != split_indices(labels, 4, "dirichlet", alpha=0.3, seed=8)
    assert sorted(i for s in p1 for i in s) == list(range(400))  # a partition: every example once
    share = [max(np.bincount([labels[i] for i in s], minlength=4)) / len(s) for s in p1]
    iid = split_indices(labels, 4, "iid", seed=7)
    assert sorted(len(s) for s in iid) == [100] * 4
    iid_share = [max(np.bincount([labels[i] for i in s], minlength=4)) / len(s) for s in iid]
    assert np.mean(share) > np.mean(iid_share) + 0.1  # alpha 0.3 concentrates labels
    with pytest.raises(OffsiteError, match="alpha"):
        split_indices(labels, 4, "dirichlet", alpha=0.0)
    with pytest.raises(OffsiteError, match="cannot give"):
        split_indices(labels[:5], 4)


def test_partition_of_a_file(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": "ab"[i % 2]}) + "\n"
                         for i in range(40)))
    shards = make_shards(str(f), 3, "dirichlet", alpha=1.0, seed=1)
    out = write_shards(shards, tmp_path / "shards")
    info = json.loads((out / "partition.json").read_text())
    assert sum(s["examples"] for s in info["shards"]) == 40
    from offsite.tune import file_data

    assert sum(len(file_data(str(out / f"client-{k}.jsonl")).items) for k in range(3)) == 40
    with pytest.raises(OffsiteError, match="label field"):
        make_shards(str(f), 3, label_field="topic")


def test_bad_command_lines_exit_2_with_one_line(tmp_path, capsys):
    from offsite.cli import main

    assert main(["federate", "partition", "--task", "arc_easy", "--clients", "4", "--alpha", "-1",
                 "--out", str(tmp_path / "s")]) == 2
    assert main(["federate", "run", "--emulator", str(tmp_path / "none"), "--shards", str(tmp_path),
                 "--clients", "2", "--out", str(tmp_path / "o")]) == 2
    assert main(["federate", "run", "--emulator", str(tmp_path), "--shards", str(tmp_path),
                 "--clients", "1", "--out", str(tmp_path / "o")]) == 2  # SecAgg+ needs two
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "at least 2 clients" in err[2]
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()
    # counts, timeouts and fractions are checked before anything is read, written or started
    run = ["federate", "run", "--emulator", str(tmp_path / "none"), "--shards", str(tmp_path / "none"),
           "--out", str(tmp_path / "o"), "--engine", "deployment", "--clients", "3"]
    for extra, why in ((["--round-timeout", "-1"], "round_timeout"), (["--round-timeout", "0"], "round_timeout"),
                       (["--round-timeout", "nan"], "round_timeout"), (["--min-clients", "4"], "min_clients"),
                       (["--no-secagg", "--min-clients", "4"], "min_clients"), (["--min-clients", "1"], "min_clients"),
                       (["--fraction-fit", "1.5"], "fraction_fit"), (["--fraction-fit", "0"], "fraction_fit"),
                       (["--fraction-fit", "0.3"], "minimum of 2"), (["--rounds", "0"], "rounds"),
                       (["--lr", "inf"], "lr"), (["--proximal-mu", "nan"], "proximal_mu"),
                       (["--dp-delta", "1e-3"], "--dp-delta needs --dp-epsilon"), (["--dp-epsilon", "-1"], "--dp-epsilon")):
        assert main(run + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], (extra, err)
    assert main(run[:-4] + ["--cpus-per-client", "0", "--clients", "3"]) == 2  # simulation
    assert "--cpus-per-client" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_run_always_ends_in_a_final_status(tmp_path):
    """federation.json ends "failed" (the reason on one line), "interrupted" (Ctrl-C, SIGTERM) or as
    the owner left it (a final state is kept); where nothing was started nothing is written."""
    import signal
    import time

    from offsite.federated.run import Interrupted, settling

    cfg = FederationConfig(emulator="e", out=str(tmp_path / "fed"), clients=2)
    (tmp_path / "fed").mkdir()
    state = tmp_path / "fed" / "federation.json"
    state.write_text(json.dumps({"status": "running", "rounds": [{"round": 1}]}))
    with pytest.raises(OffsiteError), settling(cfg):
        raise OffsiteError("round 2: \x1b[31mno\x1b[0m update\narrived")
    st = json.loads(state.read_text())
    assert st["status"] == "failed" and st["error"] == "round 2: no update arrived" and st["rounds"] == [{"round": 1}]
    state.write_text(json.dumps({"status": "running"}))
    with pytest.raises(Interrupted), settling(cfg):  # a real SIGTERM to this process
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    assert json.loads(state.read_text()) == {"status": "interrupted", "error": "stopped by SIGTERM"}
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler before is back
    state.write_text(json.dumps({"status": "running"}))
    with pytest.raises(KeyboardInterrupt), settling(cfg):
        raise KeyboardInterrupt
    assert json.loads(state.read_text())["status"] == "interrupted"
    state.write_text(json.dumps({"status": "done"}))
    with pytest.raises(RuntimeError), settling(cfg):
        raise RuntimeError("after the end")
    assert json.loads(state.read_text()) == {"status": "done"}
    with pytest.raises(OffsiteError), settling(FederationConfig(emulator="e", out=str(tmp_path / "none"))):
        raise OffsiteError("refused before anything started")
    assert not (tmp_path / "none").exists()


def test_stopping_a_deployment_ends_every_process_it_started(tmp_path):
    """Processes.stop ends what was started, what that started in a session of its own (as the
    SuperLink's SuperExec does), and a process that ignores SIGTERM (after the grace period)."""
    import sys
    import time

    import psutil

    from offsite.federated.deploy import Processes

    child = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
             "time.sleep(600)")
    procs = Processes(tmp_path, {**os.environ, "FLWR_HOME": str(tmp_path / "home")})
    leader = procs.start("tree", [sys.executable, "-c", child])
    deadline = time.time() + 30
    while len(procs.tagged()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    tree = procs.tagged()
    assert len(tree) == 2 and any(os.getpgid(p.pid) != leader.pid for p in tree)  # one in a session of its own
    t0 = time.time()
    procs.stop(grace=1.0)
    assert time.time() - t0 < 10
    assert leader.poll() is not None and procs.tagged() == []
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)


# ---------------------------------------------------------------------------------------------
# real Flower runs on a tiny model


@pytest.fixture(scope="module")
def fed_setup(tmp_path_factory):
    from conftest import make_tokenizer, tiny_model

    from offsite.bundle import save_emulator
    from offsite.emulator import build_emulator

    root = tmp_path_factory.mktemp("fed")
    tok = make_tokenizer()
    save_emulator(build_emulator("uniform", tiny_model("llama", 6, seed=0), tok, "tiny", "2,2", keep=1), root / "emu")
    # a data owner holding an emulator of another model (other starting adapter, other digest)
    save_emulator(build_emulator("uniform", tiny_model("llama", 6, seed=1), tok, "tiny", "2,2", keep=1), root / "other")
    rng = random.Random(0)
    (root / "shards").mkdir()
    for c, n in enumerate((14, 26, 10)):
        with open(root / "shards" / f"client-{c}.jsonl", "w") as f:
            for _ in range(n):
                a = rng.randint(0, 9)
                f.write(json.dumps({"prompt": f"Q: {a}+{c}=", "completion": f" {a + c}"}) + "\n")
    return root


def _cfg(root, name, clients, rounds, secagg):
    return FederationConfig(emulator=str(root / "emu"), out=str(root / name), clients=clients, rounds=rounds,
                            local_steps=2, batch_size=4, micro_batch_size=4, lr=3e-4, max_length=48,
                            secagg=secagg, round_timeout=600, node_timeout=300)


def _adapter(path):
    from offsite.bundle import load_adapter

    return load_adapter(path).state


def _max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def plain_run(fed_setup):
    """FedAvg without SecAgg+ on the simulation engine: 3 data owners, owner 2 holding another emulator."""
    from offsite.federated.run import run_simulation

    cfg = _cfg(fed_setup, "plain", 3, 2, secagg=False)
    state = _simulate(cfg, fed_setup, emulators={2: str(fed_setup / "other")})
    return cfg, state


def _simulate(cfg, root, **kw):
    from offsite.federated.client import make_client_app
    from offsite.federated.run import finished_state
    from offsite.federated.server import make_server_app
    from flwr.simulation import run_simulation

    run_simulation(server_app=make_server_app(cfg),
                   client_app=make_client_app(str(root / "shards"), str(root / cfg.out / "clients"), secagg=cfg.secagg,
                                              **kw),
                   num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False}})
    return finished_state(cfg)


def test_simulation_round_trip_and_refusal(plain_run, fed_setup):
    cfg, state = plain_run
    assert state["status"] == "done" and len(state["rounds"]) == 2
    # the owner of another emulator is refused at the handshake, with one line naming why
    assert len(state["refused"]) == 1
    reason = next(iter(state["refused"].values()))
    assert "\n" not in reason and "data owner 2 refused" in reason and "emulator" in reason
    for r in state["rounds"]:
        assert r["clients"] == [0, 1] and r["failures"] == 0
        assert r["examples"] == [state["clients"]["0"]["train_examples"], state["clients"]["1"]["train_examples"]]
        assert r["val_loss"] is not None and r["val_loss"] > 0
        assert r["bytes_to_clients"] > 0 and r["bytes_from_clients"] > 0
    # the emulator bundle went to the two owners without one, once (setup bytes), not every round
    bundle_bytes = sum(f.stat().st_size for f in (fed_setup / "emu").iterdir())
    assert state["setup_bytes"]["to_clients"] >= 2 * bundle_bytes
    # every round is a loadable adapter bundle for the emulator, and the final one is the last round's
    first, last = _adapter(fed_setup / "plain" / "rounds" / "round-0001"), _adapter(fed_setup / "plain" / "adapter")
    assert _max_diff(last, _adapter(fed_setup / "plain" / "rounds" / "round-0002")) == 0
    assert _max_diff(first, last) > 0
    from offsite.bundle import load_emulator
    from offsite.plug import plug_into_emulator
    from offsite.bundle import load_adapter

    plug_into_emulator(load_emulator(fed_setup / "emu"), load_adapter(fed_setup / "plain" / "adapter"))


def test_secagg_aggregate_equals_plain_fedavg(plain_run, fed_setup):
    """The same clients, the same starting adapter, one round: the SecAgg+ sum (masked, quantized,
    unmasked by Flower's protocol) gives the plain FedAvg of the same updates to float tolerance."""
    cfg = _cfg(fed_setup, "secagg", 2, 1, secagg=True)
    state = _simulate(cfg, fed_setup)
    assert state["rounds"][0]["secagg"] and state["rounds"][0]["clients"] == [0, 1]
    plain_r1 = _adapter(fed_setup / "plain" / "rounds" / "round-0001")
    sec_r1 = _adapter(fed_setup / "secagg" / "rounds" / "round-0001")
    init = load_init(fed_setup)
    update = max(float((plain_r1[k] - init[k]).abs().max()) for k in init)
    assert update > 1e-4  # the round moved the adapter
    assert _max_diff(plain_r1, sec_r1) < 1e-6
    # SecAgg+ sends more bytes back (masked integers, keys, shares)
    assert state["rounds"][0]["bytes_from_clients"] > plain_run[1]["rounds"][0]["bytes_from_clients"]


def load_init(root):
    from offsite import adapters
    from offsite.bundle import load_emulator

    emu = load_emulator(root / "emu")
    return adapters.extract(emu.model, emu.adapter_positions, "full")


def test_resume_from_a_round_checkpoint_gives_the_same_adapter(plain_run, fed_setup):
    """A server stopped after round 1 leaves round-0001 and federation.json naming one round; run
    again, it resumes with round 2 and ends with the adapter of the uninterrupted run."""
    src, dst = fed_setup / "plain", fed_setup / "resumed"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("clients", "adapter", "round-0002"))
    st = json.loads((dst / "federation.json").read_text())
    st["rounds"] = st["rounds"][:1]
    st["status"] = "stopped"
    (dst / "federation.json").write_text(json.dumps(st))
    cfg = _cfg(fed_setup, "resumed", 3, 2, secagg=False)
    state = _simulate(cfg, fed_setup, emulators={2: str(fed_setup / "other")})
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    assert _max_diff(_adapter(dst / "adapter"), _adapter(src / "adapter")) == 0
    # other settings in the same directory are refused with one line
    from offsite.federated.server import Owner

    with pytest.raises(OffsiteError, match="other settings"):
        Owner(_cfg(fed_setup, "resumed", 3, 2, secagg=True))


def test_client_refuses_an_adapter_for_another_emulator(fed_setup):
    from offsite.federated.client import make_client_fn
    from flwr.app import Context, RecordDict

    fn = make_client_fn(str(fed_setup / "shards"), str(fed_setup / "refusal"), emulators={0: str(fed_setup / "emu")})
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    client = fn(ctx)
    cfg = {"emulator_digest": "0" * 64, "round": 1, "lr": 1e-3, "local_steps": 1, "batch_size": 2,
           "micro_batch_size": 2, "max_length": 32, "seed": 1, "val_fraction": 0.1}
    from flwr.common import FitIns, ndarrays_to_parameters

    with pytest.raises(OffsiteError) as e:
        client.fit(FitIns(ndarrays_to_parameters([]), cfg))
    assert "refuses the round" in str(e.value) and "\n" not in str(e.value)


def test_deployment_engine_on_loopback(plain_run, fed_setup):
    """A SuperLink and 2 SuperNodes as processes on 127.0.0.1 (each with its own data file), the
    run submitted with `flwr run`, SecAgg+ on: 2 rounds finish, and round 1 is the simulation's."""
    from offsite.federated.deploy import run_deployment

    cfg = _cfg(fed_setup, "deployed", 2, 2, secagg=True)
    state = run_deployment(cfg, [fed_setup / "shards" / f"client-{i}.jsonl" for i in range(2)], timeout=900)
    assert state["status"] == "done" and [r["round"] for r in state["rounds"]] == [1, 2]
    assert all(r["clients"] == [0, 1] and r["val_loss"] is not None for r in state["rounds"])
    assert state["setup_bytes"]["to_clients"] > 0  # the bundle went over Flower
    assert _max_diff(_adapter(fed_setup / "deployed" / "rounds" / "round-0001"),
                     _adapter(fed_setup / "plain" / "rounds" / "round-0001")) < 1e-6
    logs = {p.name for p in (fed_setup / "deployed" / "deploy").glob("*.log")}
    assert {"superlink.log", "supernode-0.log", "supernode-1.log"} <= logs


def _descendants() -> dict:
    """pid -> (create time, process group, command line) of this process's live descendants."""
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[p.pid] = (p.create_time(), os.getpgid(p.pid), " ".join(p.cmdline()))
        except (psutil.Error, OSError):
            pass
    return out


def _still_alive(seen: dict) -> list:
    import psutil

    left = []
    for pid, (created, _, cmd) in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append(cmd[:200])
        except psutil.Error:
            pass
    groups = {g for _, g, _ in seen.values()} - {os.getpgid(0)}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline())[:200])
        except (psutil.Error, OSError):
            pass
    return left


def test_deployment_drops_a_node_killed_mid_round(fed_setup):
    """SecAgg+, 3 SuperNodes on 127.0.0.1. When SuperNode 2 receives round 1's training message it is
    killed with SIGKILL, with its process group (its SuperExec and the ClientApp at work: the machine
    dies). The training exchange waits the round timeout for it, drops it, and SecAgg+ unmasks the
    sum of owners 0 and 1 (its threshold for 3 is 2); the evaluation goes to them only; the run
    ends "done", and no process of the deployment is left (the ServerApp included, which the
    SuperLink's SuperExec starts in a session of its own)."""
    import signal
    import threading
    import time

    from offsite.federated.deploy import run_deployment

    cfg = _cfg(fed_setup, "killed", 3, 1, secagg=True)
    cfg.round_timeout, cfg.node_timeout = 30, 120
    result = {}

    def run():
        try:
            result["state"] = run_deployment(cfg, [fed_setup / "shards" / f"client-{i}.jsonl" for i in range(3)],
                                             timeout=600, emulators={i: str(fed_setup / "emu") for i in range(3)})
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            result["error"] = exc
        result["end"] = time.monotonic()

    log = fed_setup / "killed" / "deploy" / "supernode-2.log"
    t0 = time.monotonic()
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    killed, seen = None, {}
    while runner.is_alive() and killed is None:
        # SecAgg+'s setup and key-sharing stages come first, then the training (the masked update)
        if log.is_file() and log.read_text(errors="replace").count("Receiving: train message") >= 3:
            seen = _descendants()
            node = [pid for pid, (_, _, cmd) in seen.items() if "flower-supernode" in cmd and "partition-id=2 " in cmd]
            assert len(node) == 1
            os.killpg(seen[node[0]][1], signal.SIGKILL)
            killed = time.monotonic()
        time.sleep(0.2)
    runner.join(timeout=600)
    assert killed is not None, f"SuperNode 2 never got its training message: {result.get('error')}"
    assert "error" not in result, result["error"]
    state = result["state"]
    (r,) = state["rounds"]
    assert state["status"] == "done"
    assert r["clients"] == [0, 1] and r["dropped"] == [2] and r["failures"] >= 1
    assert any("no answer within the round timeout" in why for why in r["failure_reasons"])
    assert r["val_clients"] == 2 and r["eval_seconds"] < cfg.round_timeout  # not waited for again
    assert result["end"] - killed < 4 * cfg.round_timeout
    print(f"kill test: {result['end'] - t0:.1f} s in all, {result['end'] - killed:.1f} s after the kill")
    # every process of the deployment has ended: those seen while it ran (by pid and start time),
    # anything in their process groups, anything carrying its FLWR_HOME
    assert any("flwr-serverapp" in cmd for _, _, cmd in seen.values())
    assert _still_alive(seen) == []
    from offsite.federated.deploy import Processes

    home = str((fed_setup / "killed" / "deploy" / "flwr-home").resolve())
    assert Processes(fed_setup, {"FLWR_HOME": home}).tagged() == []


def test_a_data_owner_dying_mid_round_does_not_stop_the_run(fed_setup):
    """SecAgg+, 3 data owners, 2 rounds: owner 1's ClientApp dies in round 1's first SecAgg+ stage
    (setup, before it shared its keys: flwr 1.42's own workflow would stop the round), owner 2's in
    round 2 after one local step (its keys are out: the others' shares rebuild its masks). Each
    round aggregates the other two, and the run finishes."""
    cfg = _cfg(fed_setup, "dying", 3, 2, secagg=True)
    state = _simulate(cfg, fed_setup, fail=[{"partition": 1, "round": 1, "stage": "setup"},
                                            {"partition": 2, "round": 2, "after_steps": 1}])
    r1, r2 = state["rounds"]
    assert r1["clients"] == [0, 2] and r1["failures"] >= 1
    assert r2["clients"] == [0, 1] and r2["failures"] >= 1 and r2["val_loss"] is not None
    assert r1["dropped"] == r2["dropped"] == []  # an error reply is a failure of that exchange, not a dropout
    assert state["status"] == "done"
    # the unmasked sums are adapter updates, not mask residue (which is of the order of the clip range)
    init, first = load_init(fed_setup), _adapter(fed_setup / "dying" / "rounds" / "round-0001")
    assert 0 < _max_diff(first, init) < 0.05
    assert 0 < _max_diff(_adapter(fed_setup / "dying" / "adapter"), first) < 0.05


def test_owner_plugs_in_the_federated_adapter_and_scores_the_table(tmp_path, tokenizer):
    """The owner's last step (no Flower here): the adapter of the last round checkpoint plugged
    into the full model, the table's rows and the per-round records in the results format."""
    from conftest import tiny_model

    from offsite.bundle import save_emulator
    from offsite.data.own import resolve_task
    from offsite.emulator import build_emulator
    from offsite.experiment.federated import evaluate_federated
    from offsite.federated.server import ByteCounter, Owner

    model = tiny_model("llama", 6, seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=1), tmp_path / "emu")
    cfg = FederationConfig(emulator=str(tmp_path / "emu"), out=str(tmp_path / "fed"), clients=2, rounds=1,
                           secagg=False)
    owner = Owner(cfg)
    moved = [a + 0.01 for a in owner.initial]
    owner.checkpoint(1, moved, {"round": 1, "clients": [0, 1], "val_loss": 1.5, "bytes_to_clients": 10,
                                "bytes_from_clients": 20, "fit_seconds": 0.1})
    owner.finish(ByteCounter())
    (tmp_path / "mc.jsonl").write_text("".join(
        json.dumps({"question": f"{i}+1=?", "choices": [str(i + 1), str(i + 2)], "answer": str(i + 1)}) + "\n"
        for i in range(6)))
    records, notes = evaluate_federated(str(tmp_path / "tiny"), cfg, resolve_task(str(tmp_path / "mc.jsonl")), 5, 0)
    rows = {(r["row"], r["metric"]) for r in records}
    assert {("full_zs", "acc"), ("emu_ft", "acc"), ("plugin", "acc"), ("federated_round", "val_loss"),
            ("federated_round", "bytes_to_clients")} <= rows
    assert all(r["n"] == 5 for r in records if r["metric"] == "acc")
    assert json.loads((tmp_path / "fed" / "federation.json").read_text())["status"] == "done"


def test_owner_sends_a_correction_at_the_global_adapter_and_clients_apply_it(fed_setup, tmp_path, tokenizer,
                                                                          monkeypatch):
    """--assist --tune-blocks bottom: the owner's correction at the global adapter (safetensors
    bytes in the round's config) is what offsite.assist computes; a client trains only the bottom
    blocks, and the correction changes its update; bytes that are not safetensors are refused."""
    import torch
    from conftest import tiny_model
    from flwr.app import Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from safetensors.torch import load

    import offsite.data.tasks as tasks
    from offsite.assist import AssistOptions, Assistant
    from offsite.bundle import load_emulator
    from offsite.federated.client import make_client_fn
    from offsite.federated.core import arrays_to_state
    from offsite.federated.server import Owner

    tiny_model("llama", 6, seed=0).save_pretrained(tmp_path / "tiny")  # the model fed_setup's emulator came from
    tokenizer.save_pretrained(tmp_path / "tiny")
    pairs = [("Q: 1+1=", " 2"), ("Q: 2+3=", " 5"), ("Q: 4+4=", " 8")]
    monkeypatch.setattr(tasks, "load_task", lambda name, part: [])
    monkeypatch.setattr(tasks, "train_pairs", lambda docs: pairs)
    cfg = FederationConfig(emulator=str(fed_setup / "emu"), out=str(tmp_path / "fed"), clients=2, rounds=1,
                           secagg=False, tune_blocks="bottom", assist=True, model=str(tmp_path / "tiny"))
    owner = Owner(cfg)
    c = load(owner.correction())
    assert sorted(c) == owner.trained and all(k.startswith(("blocks.0.", "blocks.1.")) for k in c)
    from offsite.models.load import load_model

    direct = Assistant(load_model(str(tmp_path / "tiny"))[0], load_emulator(fed_setup / "emu"), AssistOptions(every=2))
    want = direct.correction({k: v for k, v in arrays_to_state(owner.keys, owner.global_arrays).items() if k in c})
    assert all(torch.allclose(c[k], want[k], atol=1e-6) for k in c)
    with pytest.raises(OffsiteError, match="needs the full model"):
        FederationConfig(emulator="e", out="o", clients=2, assist=True).check()

    client = make_client_fn(str(fed_setup / "shards"), str(tmp_path / "clients"),
                            emulators={0: str(fed_setup / "emu")})(
        Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={}))
    conf = {"emulator_digest": owner.manifest["digest"], "round": 1, "lr": 1e-3, "local_steps": 2, "batch_size": 4,
            "micro_batch_size": 4, "max_length": 48, "seed": 1, "val_fraction": 0.1, "tune_blocks": "bottom"}
    params = ndarrays_to_parameters(owner.initial)

    def update(config):
        return dict(zip(owner.keys, parameters_to_ndarrays(client.fit(FitIns(params, config)).parameters)))

    plain, corrected = update(conf), update({**conf, "correction": owner.correction()})
    for k in owner.keys:
        bottom = k.startswith(("blocks.0.", "blocks.1."))
        assert bool(np.abs(plain[k]).max() > 0) == bottom, k  # the top blocks stay as shipped
    assert max(float(np.abs(plain[k] - corrected[k]).max()) for k in owner.trained) > 0
    with pytest.raises(OffsiteError, match="not a safetensors file"):
        update({**conf, "correction": b"not a tensor file"})


# ---------------------------------------------------------------------------------------------
# user-level differential privacy (DP-FedAvg with Flower's DP wrappers)


def test_federated_dp_plan_is_opacus_accountant_over_rounds():
    from opacus.accountants.utils import get_noise_multiplier

    from offsite.bundle import DP_SCHEMA, check_schema
    from offsite.dp import dp_summary, spent_epsilon

    cfg = FederationConfig(emulator="e", out="o", clients=8, rounds=20, fraction_fit=0.5, dp_epsilon=4.0, dp_clip=0.1)
    cfg.check()
    plan = cfg.dp_plan()
    assert (plan.unit, plan.sampling, plan.examples, plan.steps) == ("data owner", "fixed-size", 8, 20)
    assert plan.sample_rate == pytest.approx(0.5) and plan.delta == pytest.approx(1 / 80) and plan.clip == 0.1
    assert plan.noise_multiplier == pytest.approx(get_noise_multiplier(target_epsilon=4.0, target_delta=1 / 80,
                                                                       sample_rate=0.5, steps=20, accountant="rdp"))
    rec = plan.record(20)
    check_schema({"dp": rec}, type(DP_SCHEMA)({"dp": DP_SCHEMA}), "m")
    assert rec["epsilon"] == pytest.approx(spent_epsilon(plan, 20)) and rec["epsilon"] <= 4.0 + 1e-9
    assert "per data owner" in dp_summary(rec) and "20 rounds of DP-FedAvg" in dp_summary(rec)
    assert FederationConfig(emulator="e", out="o", clients=4, dp_epsilon=1.0).dp_plan().sampling == "every owner"
    assert FederationConfig(emulator="e", out="o", clients=4).dp_plan() is None
    # the noise was chosen for these rounds: a resumed run must keep them
    assert "rounds" in cfg.fingerprint() and "rounds" not in FederationConfig(emulator="e", out="o").fingerprint()


def test_dp_federation_with_secagg_clips_each_update_and_noises_the_sum(fed_setup):
    """2 data owners, SecAgg+, 2 rounds, DP-FedAvg at epsilon 8 with a tiny clip: the SecAgg+ sum
    the owner unmasks is the mean of updates clipped on the clients (its norm within the clip), Flower's
    noise is added to it, no per-owner statistics travel, and the adapter's manifest holds the guarantee."""
    from offsite.bundle import load_adapter

    clip = 1e-3
    cfg = _cfg(fed_setup, "dp", 2, 2, secagg=True)
    cfg.dp_epsilon, cfg.dp_clip = 8.0, clip
    state = _simulate(cfg, fed_setup)
    plan = cfg.dp_plan()
    for r in state["rounds"]:
        assert r["clients"] == [0, 1] and r["examples"] == [1, 1] and r["secagg"]
        assert 0 < r["update_norm"] <= clip * 1.01  # the clients clipped (an unclipped round moves ~100x more)
        assert r["dp_noise_std"] == pytest.approx(plan.noise_multiplier * clip / 2)
        assert r["train_loss"] is None and r.get("val_loss") is None  # no loss left an owner
    dp = load_adapter(fed_setup / "dp" / "adapter").dp
    assert dp == state["dp"] and dp["unit"] == "data owner" and dp["steps"] == 2 and dp["examples"] == 2
    assert 0 < dp["epsilon"] <= 8.0 and dp["delta"] == pytest.approx(1 / 20) and dp["clip"] == clip
    assert dp["noise_multiplier"] == pytest.approx(plan.noise_multiplier) and dp["sample_rate"] == 1.0
    assert load_adapter(fed_setup / "dp" / "rounds" / "round-0001").dp["steps"] == 1
    noise = _max_diff(_adapter(fed_setup / "dp" / "adapter"), load_init(fed_setup))
    assert noise > clip  # the noise (std ~ sigma x clip / 2 per coordinate) moved it beyond the clipped mean
