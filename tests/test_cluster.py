"""A real two-node Ray cluster on this machine: ``ray start --head`` plus a second ``ray start
--address ...`` node, on loopback, each with its own custom resources and its own ports. A
scenario run through ``lme-sim run --address`` with STRICT_SPREAD puts one shard on each node and
gives the same results as the same scenario on a single node. Every Ray process the fixture
started is gone afterwards (checked)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lme_sim.storage.logger import read_only_query

SCENARIO = """
name: {name}
model: world:small
data: {{kind: world, n_edits: 20, seed: 5}}
editor: {{method: alphaedit}}
stream: {{batch_size: 10}}
eval: {{every: 1, fluency_prompts: 0}}
runtime: {{shards: 2, placement: {placement}}}
db: {db}
"""
RAY = Path(sys.executable).with_name("ray")
LME_SIM = Path(sys.executable).with_name("lme-sim")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _session_processes(sids: set[int]) -> list[str]:
    """Live (not zombie) processes in the given sessions, as 'pid cmdline'."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.getsid(pid) not in sids:
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if state != "Z":
            found.append(f"{pid} {cmd}")
    return found


def _ray_start(args: list[str], ports: dict[str, int], log: Path, env: dict) -> subprocess.Popen:
    """``ray start --block`` in a session of its own: every process it and its raylet spawn is in it."""
    flags = [f"--{k}={v}" for k, v in ports.items()]
    return subprocess.Popen(
        [
            str(RAY),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--object-store-memory=100000000",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
            *args,
            *flags,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the sessions, SIGKILL what is left after a grace period, and check none survives."""
    sids = {p.pid for p in procs}
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):
        for pid in sids:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + grace
        while _session_processes(sids) and time.time() < deadline:
            time.sleep(0.5)
        if not _session_processes(sids):
            return
    raise AssertionError(f"Ray processes left running: {_session_processes(sids)}")


@pytest.fixture(scope="module")
def two_node_cluster(small_world):
    """(GCS address, {node name: log file}): a head and a worker node, each offering two shard slots
    and its own marker resource, so only STRICT_SPREAD puts one shard on each."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp = Path(tempfile.mkdtemp(prefix="lmeray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    names = [
        "port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    ]
    free = _free_ports(2 * len(names))
    head_ports = dict(zip(names, free))
    worker_ports = dict(zip(names[1:], free[len(names) :]))
    worker_ports.pop("dashboard-port")
    address = f"127.0.0.1:{head_ports['port']}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            _ray_start(
                [
                    "--head",
                    f"--temp-dir={temp}",
                    "--include-dashboard=false",
                    '--resources={"lme_shard_slot": 2, "node_a": 1}',
                ],
                head_ports,
                temp / "head.log",
                env,
            )
        )
        _wait_for(temp / "head.log", "Ray runtime started", procs[0])
        procs.append(
            _ray_start(
                [f"--address={address}", '--resources={"lme_shard_slot": 2, "node_b": 1}'],
                worker_ports,
                temp / "worker.log",
                env,
            )
        )
        _wait_for(temp / "worker.log", "Ray runtime started", procs[1])
        yield address, temp
    finally:
        try:
            _stop(procs)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while text not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"ray start did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _run(scenario: Path, cache: Path, *args: str) -> str:
    env = {**os.environ, "LME_SIM_CACHE": str(cache), "COLUMNS": "400"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(LME_SIM), "run", str(scenario), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    return out


def _results(db: Path) -> dict:
    q = lambda sql: read_only_query(db, sql)[1]  # noqa: E731
    return {
        "metrics": q("select eval_id, batch_id, name, value from metrics order by eval_id, name"),
        "edits": q(
            "select edit_id, batch_id, case_id, target_new, modules, delta_norms from edits order by edit_id"
        ),
        "weights": q(
            "select batch_id, module, frobenius, spectral, condition, cum_delta_norm from weight_stats "
            "order by batch_id, module"
        ),
        "probes": q(
            "select eval_id, edit_id, batch_id, logprob, correct from probes order by eval_id, edit_id"
        ),
        "status": q("select status from runs"),
    }


def _assert_close(a, b, path=""):
    if isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_scenario_spread_over_two_nodes_equals_single_node(two_node_cluster, tmp_path, small_world):
    address, _ = two_node_cluster
    world_cache = Path(os.environ["LME_SIM_CACHE"]) / "worlds"
    caches = {}
    for where in ("cluster", "single"):  # own key statistics and projectors each; the trained world shared
        caches[where] = tmp_path / f"cache-{where}"
        shutil.copytree(world_cache, caches[where] / "worlds")
    spread, single = tmp_path / "spread.duckdb", tmp_path / "single.duckdb"
    (tmp_path / "spread.yaml").write_text(
        SCENARIO.format(name="spread", placement="STRICT_SPREAD", db=spread)
    )
    (tmp_path / "single.yaml").write_text(SCENARIO.format(name="single", placement="PACK", db=single))

    out = _run(tmp_path / "spread.yaml", caches["cluster"], "--address", address)
    placed = re.search(
        r"placement STRICT_SPREAD: layers 0-1 on node (\w+) \(.*\); layers 2-3 on node (\w+) ", out
    )
    assert placed, out
    assert placed[1] != placed[2]  # one shard on each node
    # key statistics and projectors were computed through the shards and written to the (shared) cache
    assert len(list(caches["cluster"].glob("stats/*/layer*-nullspace-*.pt"))) == 2

    out_single = _run(tmp_path / "single.yaml", caches["single"])
    assert "placement PACK: layers 0-1 on node" in out_single
    a, b = _results(single), _results(spread)
    assert a["status"] == b["status"] == [("finished",)]
    assert len(a["edits"]) == 20 and len(a["metrics"]) > 0 and len(a["probes"]) > 0
    for table in a:
        _assert_close(a[table], b[table], table)
    print(json.dumps({"metrics (single = spread)": a["metrics"][-8:]}, default=str))
