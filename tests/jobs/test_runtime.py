"""jobs.runtime: the embedded local Ray listens on loopback only.

The instance under test is started in a subprocess of its own (not the session's `ray_local`), and only
the sockets of that subprocess's own descendants are inspected (Linux /proc; no other Ray on the machine
is looked at or touched).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")]
ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import ray
from jobs.runtime import ensure_ray


def descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def listening_by_inode():
    out = {}
    for family in ("tcp", "tcp6"):
        for line in open(f"/proc/net/{family}").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ip_hex, port_hex = fields[1].split(":")
                raw = bytes.fromhex(ip_hex)
                if family == "tcp":
                    ip = ".".join(str(b) for b in raw[::-1])
                else:  # four little-endian 32-bit words
                    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                    ip = bytes(b for w in words for b in w).hex()
                out[fields[9]] = (ip, int(port_hex, 16))
    return out


joined = ensure_ray(num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process exists too
time.sleep(2)  # the metrics agent and exporter start a moment after init returns
sockets, names = listening_by_inode(), set()
listening = []
for pid in descendants(os.getpid()):
    try:
        name = open(f"/proc/{pid}/comm").read().strip()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    names.add(name)
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in sockets:
            listening.append([name, *sockets[link[8:-1]]])

print(json.dumps({
    "joined": joined, "address": ray.get_runtime_context().gcs_address, "processes": sorted(names),
    "listening": sorted(listening),
}))
ray.shutdown()
"""


def test_local_instance_listens_on_loopback_only(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(ROOT)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["joined"] == "a new local Ray instance"
    assert {"gcs_server", "raylet"} <= set(result["processes"]), result["processes"]
    servers = {name for name, _, _ in result["listening"]}
    assert {"gcs_server", "raylet"} <= servers, result["listening"]
    # 127.0.0.1, ::1 and ::ffff:127.0.0.1 (gRPC's dual-stack socket bound to the IPv4 loopback)
    loopback = {"127.0.0.1", "00000000000000000000000000000001", "00000000000000000000ffff7f000001"}
    exposed = [entry for entry in result["listening"] if entry[1] not in loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert result["address"].startswith("127.0.0.1:")
