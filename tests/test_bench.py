"""The benchmarks keep running (a smoke run; what they measure is read from their output,
never asserted as timings here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.slow  # each starts a gateway and fake upstreams, then measures


def test_gateway_overhead_bench_runs_without_errors() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.gateway_overhead", "--quick",
                             "--json"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["errors"] == 0
    assert measured["rps_gateway"] > 0 and measured["seq_gateway_p50_ms"] > 0
    assert measured["rps_mtls"] > 0 and measured["seq_mtls_p50_ms"] > 0


def test_tunnel_bench_runs_without_errors() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.tunnel", "--quick", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["tunnel_p50_ms"] > 0 and measured["tunnel_mb_s"] > 0
