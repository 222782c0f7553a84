"""The short version of `make soak-cluster` (bench/soak_cluster.py), 45 s: three nodes on
one Swift bucket with local tiers behind the shipped nginx configuration, Redis with a
replica and three Sentinels, the GC worker and scheduler, clients checking every byte, and
each fault once: a node SIGKILLed mid-fill, the same node stopped as it comes back, the Redis master
killed, the S3 endpoint and the upstream stopped, a tier deleted, an evicting sweep during a
herd. The figures come from the run's own report, checked against the truth it gathered:
the bucket listed, each tier's files hashed, the upstream's and Swift's logs, Redis's keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.soak_cluster import BOUNDS
from tests.support.servers import ROOT


def test_a_cluster_gets_through_each_of_its_faults_once(tmp_path):
    result = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak_cluster"],
        cwd=ROOT,
        env={**os.environ, "SOAK_SECONDS": "45", "SOAK_CLIENTS": "8", "SOAK_RESULT": str(result)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.exists(), run.stderr[-3000:]
    figures = json.loads(result.read_text())
    report = run.stdout[-4000:] + run.stderr[-2000:]
    assert [fault["kind"] for fault in figures["faults"]] == list(BOUNDS), report
    assert figures["requests"] > 500 and figures["bytes_checked"] > 0, report
    assert figures["wrong"] == [], report
    # Every failed request fell within a fault's window, and each fault ended its failures
    # within its bound.
    assert figures["unexplained"] == [], report
    for fault in figures["faults"]:
        assert fault["recovered_after"] <= fault["bound"], (fault, report)
    assert figures["leases_left"] == [] and figures["fills_left"] == [], report
    assert figures["verify"]["rc"] == 0, report
    for tier in figures["tiers"].values():
        assert tier["copies"] > 0 and tier["not_in_bucket"] == 0 and tier["wrong"] == 0, report
    # Single flight held through the faults: a blob the upstream sent twice was deleted
    # by the GC between, or its first fill was cut by a fault.
    assert figures["upstream"]["again_unexplained"] == [], report
    # The balancer spread the load over all three nodes.
    assert len(figures["answered_by"]) == 3 and min(figures["answered_by"].values()) > 50
    assert run.returncode == 0, report
