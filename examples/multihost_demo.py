"""Head-sharded ragged paged attention across processes (jax.distributed), on one machine.

    python examples/multihost_demo.py            # spawns 2 CPU processes x 4 devices, checks, exits 0

Each process plays a host: it joins the job with jax.distributed.initialize, builds the global
mesh over all 8 devices, holds only its own heads of the queries and the KV cache, the replicated
metadata in full, and makes the same call. The check compares each process's output shards to
the unsharded call on the full batch. On a real cluster, run the worker part once per host (with
your launcher's coordinator address, process count and id) and drop the launcher.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4


def worker(process_id: int, num_processes: int, port: int) -> None:
    import jax

    # One process per host; here "localhost" stands for the coordinator (process 0) host.
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from ragged_paged_attention import ragged_page_attention_v2
    from ragged_paged_attention.sharding import sharded_ragged_page_attention_v2, sharded_write_kv_pages

    # The global mesh: every process's devices (jax.devices() lists them all, in the same order
    # everywhere). Heads need no communication, so tensor parallelism may span hosts.
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    assert mesh.size == num_processes * DEVICES_PER_PROCESS and len(jax.local_devices()) == DEVICES_PER_PROCESS

    # Every process builds the same scheduler metadata (as every host of a server does) and,
    # for this demo, the same random tensors; each keeps only its own heads of them.
    rng = np.random.default_rng(0)
    seqs = [(1, 37), (5, 18), (0, 7), (29, 63)]  # (q_len, kv_len)
    num_q_heads, num_kv_heads, head_dim, page_size, pages_per_seq = 16, 8, 32, 16, 5
    num_pages = len(seqs) * pages_per_seq
    q_lens = np.array([q for q, _ in seqs])
    ctx = np.array([k for _, k in seqs], np.int32)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    bt = rng.permutation(num_pages).reshape(len(seqs), pages_per_seq).astype(np.int32)  # no page shared
    total = int(qsl[-1])
    q_np = rng.standard_normal((total, num_q_heads, head_dim)).astype(np.float32)
    kv_np = rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim)).astype(np.float32)
    k_new = rng.standard_normal((total, num_kv_heads, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((total, num_kv_heads, head_dim)).astype(np.float32)
    slots = np.full(total, -1, np.int32)  # the new tokens' cache slots (the last q_len of each sequence)
    for i, (q_len, kv_len) in enumerate(seqs):
        for j in range(q_len):
            pos = kv_len - q_len + j
            slots[qsl[i] + j] = bt[i, pos // page_size] * page_size + pos % page_size

    heads = NamedSharding(mesh, P(None, "tp", None))
    kv_heads = NamedSharding(mesh, P(None, None, "tp", None))
    replicated = NamedSharding(mesh, P())

    def local_heads(x, sharding):
        # Only this process's shards are materialised (a host would compute or load just these).
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    q, kn, vn = (local_heads(x, heads) for x in (q_np, k_new, v_new))
    kv = local_heads(kv_np, kv_heads)
    # Replicated metadata: every process passes the full array.
    ctx_g, bt_g, qsl_g, slots_g = (jax.make_array_from_process_local_data(replicated, x)
                                   for x in (ctx, bt, qsl, slots))

    @jax.jit
    def step(kv, q, kn, vn, slots, ctx, bt, qsl, num_seqs):
        kv = sharded_write_kv_pages(mesh, "tp", kv, kn, vn, slots)
        return sharded_ragged_page_attention_v2(mesh, "tp", q, kv, ctx, bt, qsl, num_seqs), kv

    num_seqs = jax.make_array_from_process_local_data(replicated, np.int32(len(seqs)))
    out, kv_after = step(kv, q, kn, vn, slots_g, ctx_g, bt_g, qsl_g, num_seqs)
    # The eager call checks the (replicated, concrete) metadata values once on the global arrays.
    out_eager = sharded_ragged_page_attention_v2(mesh, "tp", q, kv_after, ctx_g, bt_g, qsl_g, len(seqs))

    # Unsharded reference on this process's first device, from the full host copies.
    with jax.default_device(jax.local_devices()[0]):
        from ragged_paged_attention.kv_cache import write_kv_pages

        kv_ref = write_kv_pages(jnp.asarray(kv_np), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots))
        want = np.asarray(ragged_page_attention_v2(jnp.asarray(q_np), kv_ref, jnp.asarray(ctx), jnp.asarray(bt),
                                                   jnp.asarray(qsl), len(seqs)))
        kv_ref = np.asarray(kv_ref)
    for arr, ref in ((out, want), (out_eager, want), (kv_after, kv_ref)):
        assert len(arr.addressable_shards) == DEVICES_PER_PROCESS
        for shard in arr.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), ref[shard.index], rtol=0, atol=1e-6)
    print(f"process {jax.process_index()}: {len(out.addressable_shards)} local shards of "
          f"{out.shape} match the unsharded call", flush=True)
    jax.distributed.shutdown()


def launch() -> int:
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--process-id", str(i), "--num-processes",
                               str(NUM_PROCESSES), "--port", str(port)], env=env)
             for i in range(NUM_PROCESSES)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        print(f"worker exit codes {codes}", flush=True)
        return 1
    print(f"sharded == unsharded on every process ({NUM_PROCESSES} processes x {DEVICES_PER_PROCESS} "
          f"devices, {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--num-processes", type=int, default=NUM_PROCESSES)
    parser.add_argument("--port", type=int)
    a = parser.parse_args()
    if a.process_id is None:
        sys.exit(launch())
    worker(a.process_id, a.num_processes, a.port)
