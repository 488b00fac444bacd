"""`myco up`: a local node and a gateway paired with it, children that end with this process.

The gateway pins the local node's id (MYCO_GATEWAY_LOCAL_NODE_ID).  Ctrl-C, SIGHUP (a closed
terminal) and SIGTERM (a service manager) stop the children in order, SIGINT and then SIGKILL
after `grace` seconds; if `myco up` is killed, Linux sends each SIGTERM (myco/lifeline.py).  In
sessions of their own, they get no Ctrl-C or hang-up but from us.  A port already taken stops
it first, exit status 1, naming what holds it ("a mycoSwarm gateway is already running at URL")."""

from __future__ import annotations

import argparse
import contextlib
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from gateway import policy
from gateway.settings import GatewaySettings
from myco import lifeline
from myco.identity import load_or_create
from myco.serve import bind
from myco.tls import client_context
from nodeagent import pairing
from nodeagent.settings import NodeSettings


def _check_free(host: str, port: int, url: str, what: str, key: str, flag: str,
                verify: ssl.SSLContext | bool) -> None:
    """Exit naming what holds (host, port) unless it is free (a mycoSwarm `what` answers
    /health with `key`)."""
    try:
        bind(host, port).close()
        return
    except OSError as exc:
        held = f"{host}:{port} is taken ({exc.strerror})"
    with contextlib.suppress(httpx.HTTPError, ValueError, TypeError):
        if key in httpx.get(f"{url}/health", timeout=2, verify=verify).json():
            held = f"a mycoSwarm {what} is already running at {url}"
    raise SystemExit(f"myco: {held}; stop it, or choose another port with {flag}")


def _wait_healthy(url: str, proc: subprocess.Popen[str], tls: ssl.SSLContext,
                  timeout: float = 60) -> None:
    """Until `url` answers, so the gateway's first health check finds the node up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=1, verify=tls).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"myco: the node did not come up at {url}")


def up(args: argparse.Namespace, grace: float = 10.0) -> None:
    """Start a local node and a gateway, paired with each other; stop both when this ends."""
    policy.load(args.policy)  # a mistake stops here, before any process starts (ConfigError)
    node_settings = NodeSettings.from_env(port=args.node_port)
    gateway_settings = GatewaySettings.from_env(port=args.port)
    gateway_id = load_or_create(Path(gateway_settings.state_dir), "myco gateway")
    node_id = load_or_create(Path(node_settings.state_dir), node_settings.name)
    tls = client_context(gateway_id)
    node_url = f"https://127.0.0.1:{args.node_port}"
    _check_free(gateway_settings.host, args.port, f"http://127.0.0.1:{args.port}", "gateway",
                "policy", "--port", True)
    _check_free(node_settings.host, args.node_port, node_url, "node", "name", "--node-port", tls)
    # One machine, one user: the local node serves the local gateway.
    pairing.add(Path(node_settings.state_dir), gateway_id.id, gateway_id.pem(), "myco up")
    me = [sys.executable, "-m", "mycoswarm.cli"]
    for sig in (signal.SIGHUP, signal.SIGTERM):  # stop as for Ctrl-C
        signal.signal(sig, signal.default_int_handler)
    node = subprocess.Popen([*me, "node", "--port", str(args.node_port)], text=True,
                            start_new_session=True, env=lifeline.env())
    procs = [node]
    try:
        _wait_healthy(f"{node_url}/health", node, tls)
        gateway = subprocess.Popen(
            [*me, "gateway", "--policy", args.policy, "--port", str(args.port)],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
            env=lifeline.env(MYCO_GATEWAY_LOCAL_NODE_ID=node_id.id))
        procs.append(gateway)
        stdout = gateway.stdout
        assert stdout is not None
        if not (line := stdout.readline()):
            raise SystemExit("myco: the gateway did not start")
        print(line, end="", flush=True)
        threading.Thread(target=lambda: [print(x, end="", flush=True) for x in stdout],
                         daemon=True).start()  # keep the pipe drained
        url = line.rsplit(" ", 1)[-1].strip()
        print(f"\nmycoSwarm is up. In another terminal:\n\n"
              f"  export OPENAI_BASE_URL={url}/v1\n"
              f"  export OPENAI_API_KEY=local   # any value; the default policy asks for none\n\n"
              f"Ctrl-C stops the gateway and the node.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        raise SystemExit("myco: a process exited; stopping")
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print("\nmyco: stopping", flush=True)
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second one must not cut the stopping short
        for p in procs:
            p.send_signal(signal.SIGINT)  # does nothing to one that has exited
        for p in procs:
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
