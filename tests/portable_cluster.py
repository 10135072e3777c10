# A deterministic in-memory cluster that runs unchanged on CPython and on MicroPython.
#
# Usage: python|micropython portable_cluster.py N_REQUESTS [SEED]
# Prints one line per replica: "<id> <last_exec> <stable> <ledger digest hex>", then the
# results digest of what the clients accepted. The conformance test runs it on both
# interpreters and requires identical output: the protocol is deterministic across ports.
import hashlib
import sys

from edgebft.protocol import replica as rp
from edgebft.protocol.client import ClientCore
from edgebft.protocol.stake import Stake

N = 4
CLIENTS = 5


def keys_for(i):
    return [hashlib.sha256(bytes([min(i, j), max(i, j)])).digest() for j in range(N)]


def main(requests, seed):
    stake = Stake([1] * N)
    secrets = [hashlib.sha256(b"client secret %d" % i).digest() for i in range(N)]
    replicas = [rp.Replica(i, stake, keys_for(i), secrets[i], genesis={"a*": [CLIENTS, 1000]},
                           checkpoint_interval=4, batch_max=3, pipeline_max=2)
                for i in range(N)]
    clients = [ClientCore(c, stake, [rp.client_key(secrets[i], c) for i in range(N)])
               for c in range(CLIENTS)]
    queue = []
    rng = seed
    accepted = hashlib.sha256()
    for k in range(requests):
        c = clients[k % CLIENTS]
        op = ["transfer", "a%d" % (k % CLIENTS), "a%d" % ((k + 1) % CLIENTS), k % 7 + 1]
        if k % 3 == 1:
            op = ["put", "key%d" % (k % 4), k]
        wire = c.request(op)
        for i in range(N):
            queue.append((i, wire))
        while queue:
            rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF  # reproducible on both ports
            to, wire = queue.pop(rng % len(queue))
            r = replicas[to]
            r.receive(wire, 0)

            def to_all(wire):
                for j in range(N):
                    if j != to:
                        queue.append((j, wire))

            def to_client(c, wire):
                ok, result = clients[c].on_reply(wire)
                if ok:
                    accepted.update(repr(result).encode())

            rp.route(r.out, to_all, lambda j, wire: None, to_client)
            del r.events[:]
    for r in replicas:
        print(r.me, r.last_exec, r.h, r.ledger.digest.hex())
    print("accepted", accepted.digest().hex())


main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
