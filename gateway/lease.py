"""Leasing workers for a split: each worker device of a plan lends itself to the plan's head.

`lease(plan, model, members, pool, timeout)` asks every worker node (`POST /node/rpc/lease`,
a `protocol.LeaseRequest` carrying the head's id and certificate, which the worker's tunnel exit
then pins) and returns the `protocol.Split` the head is told in the `x-myco-split` header, or
None when the plan has no worker.  A head or worker whose id is not proven is a 503; a worker
that cannot be reached a 502; one that refuses a 503 with its reason.
"""

from __future__ import annotations

import httpx
import msgspec

from gateway.membership import Membership
from gateway.placement import Plan
from gateway.pool import ConnectionPool
from myco import protocol
from myco.errors import TargetFailed, Unavailable, error_message
from myco.tls import certificate_id


async def lease(plan: Plan, model: str, members: Membership, pool: ConnectionPool,
                timeout: float) -> protocol.Split | None:
    devices = [d for d in plan.devices if d.role == "worker"]
    if not devices:
        return None
    head_pem, head_id = members.certificate(plan.head), members.node_id(plan.head)
    if not head_pem or head_id is None or certificate_id(head_pem) != head_id:
        raise Unavailable(f"head {plan.head} has not shown a certificate with its id yet")
    workers = []
    for device in devices:
        peer, worker_id = members.peer(device.node), members.node_id(device.node)
        if peer is None or worker_id is None:
            raise Unavailable(f"worker {device.node} has no known address or id")
        try:
            status, answer = await pool.call(peer, "/node/rpc/lease", timeout, msgspec.json.encode(
                protocol.LeaseRequest(model, protocol.NodeId(head_id), head_pem, device.device)))
        except (httpx.HTTPError, TimeoutError) as exc:
            raise TargetFailed(f"worker {device.node} cannot lend {device.device}: "
                               f"{type(exc).__name__}: {exc}") from None
        if status != 200:
            raise Unavailable(f"worker {device.node} refused to lend {device.device}: "
                              f"{error_message(answer)}")
        lent = msgspec.json.decode(answer, type=protocol.Lease)
        workers.append(protocol.SplitWorker(device.node, protocol.NodeId(worker_id), peer.host,
                                            lent.tunnel_port))
    return protocol.Split(plan.n_gpu_layers, plan.tensor_split, tuple(workers))
