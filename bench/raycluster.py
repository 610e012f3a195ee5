"""A real multi-node Ray cluster on this machine with the pool open on it, for the pool benchmarks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any


@contextlib.contextmanager
def cluster_with_pool(node_cpus: Sequence[int], **pool_kw: Any) -> Iterator[tuple[Any, Any, float]]:
    """(cluster, RayPool, seconds the pool took to open) on ``ray.cluster_utils.Cluster``: a head that takes
    no actors and one worker node per entry of ``node_cpus``; the pool is closed and the cluster shut down
    after."""
    from ray.cluster_utils import Cluster

    from orchestrator.pool import RayPool

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    pool = None
    try:
        for cpus in node_cpus:
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        t0 = time.perf_counter()
        pool = RayPool(cluster.address, device="cpu", **pool_kw)
        yield cluster, pool, time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.close()
        cluster.shutdown()
