"""A real multi-node Ray cluster on this machine, for the node-failure test.

    python tests/multinode.py WORKERS CPUS_PER_WORKER

Starts a head (no CPUs, so work lands on the workers) and WORKERS worker nodes,
each its own raylet and object store on loopback (ray.cluster_utils.Cluster, the
tool Ray's own multi-node tests use), prints one JSON line with the GCS address
and each worker's raylet pid, and keeps the cluster up until its stdin closes.
Run as a child process so the cluster's processes are its own, and a test that
dies takes them down with it.
"""
import json
import sys

from ray._private import ray_constants
from ray.cluster_utils import Cluster


def main() -> None:
    workers, cpus = int(sys.argv[1]), int(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=cpus, object_store_memory=150 * 1024 ** 2) for _ in range(workers)]
    cluster.wait_for_nodes()
    raylets = [n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid for n in nodes]
    print(json.dumps({"address": cluster.address, "raylets": raylets}), flush=True)
    try:
        sys.stdin.read()  # until the test closes our stdin (or dies)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
