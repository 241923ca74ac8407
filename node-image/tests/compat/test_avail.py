"""What the machine has free, as the real dispy 4.15.2 client receives it: the
`dispy.DispyNodeAvailInfo` our dispynode puts in its PONG (handed to NodeAllocate.allocate),
its PULSEs (DispyNode.AvailInfo statuses) and its NODE_STATUS answer."""

LO = "nodes=['127.0.0.1'], host='127.0.0.1', loglevel=dispy.logger.WARNING"

# Reports an avail_info's class, its four figures and their types (None for None).
DESCRIBE = '''
def describe(a):
    if a is None:
        return None
    return {"cls": type(a).__module__ + "." + type(a).__name__,
            "is_avail_info": isinstance(a, dispy.DispyNodeAvailInfo),
            "figures": [a.cpu, a.memory, a.disk, a.swap],
            "types": [type(a.cpu).__name__, type(a.memory).__name__,
                      type(a.disk).__name__, type(a.swap).__name__]}
'''


def assert_avail_info(d):
    assert d is not None, "avail_info is None"
    assert d["cls"] == "dispy.DispyNodeAvailInfo" and d["is_avail_info"], d
    # As psutil gives them on dispy's node: percents as floats, bytes as ints.
    assert d["types"] == ["float", "int", "int", "float"], d
    cpu, memory, disk, swap = d["figures"]
    assert memory > 0 and disk > 0, d
    assert 0 <= cpu <= 100 and 0 <= swap <= 100, d


def test_node_allocate_gets_the_avail_info_of_the_pong(nodes, client):
    nodes.start()
    r = client.run(DESCRIBE + '''
seen = []
class Recording(dispy.NodeAllocate):
    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=''):
        seen.append(avail_info)
        return super().allocate(cluster, ip_addr, name, cpus, avail_info, platform)
def compute(n):
    return n + 1
cluster = dispy.JobCluster(compute, nodes=[Recording('127.0.0.1')], host='127.0.0.1',
                           loglevel=dispy.logger.WARNING)
j = cluster.submit(1)
result = j()
cluster.close()
report(result=result, calls=len(seen), first=describe(seen[0] if seen else None))
''')
    assert r["result"] == 2 and r["calls"] >= 1, r
    assert_avail_info(r["first"])


def test_pulses_bring_avail_info_statuses_to_cluster_status(nodes, client):
    nodes.start()
    r = client.run(DESCRIBE + '''
import threading
seen = []
arrived = threading.Event()
def status(st, node, job):
    if st == dispy.DispyNode.AvailInfo and node is not None and node.avail_info is not None:
        seen.append(node.avail_info)
        arrived.set()
def compute(n):
    return n
cluster = dispy.JobCluster(compute, cluster_status=status, pulse_interval=1, %s)
wait_nodes(cluster, 1)
start = time.time()
arrived.wait(8)
waited = time.time() - start
cluster.close()
report(statuses=len(seen), waited=waited, first=describe(seen[0] if seen else None))
''' % LO)
    assert r["statuses"] >= 1, "no DispyNode.AvailInfo status within 8 s of pulses every 1 s: %s" % r
    assert_avail_info(r["first"])


def test_node_status_answer_carries_avail_info(nodes, client):
    nodes.start()
    r = client.run(DESCRIBE + '''
import socket, struct, pycos
def compute(n):
    return n
cluster = dispy.JobCluster(compute, %s)
wait_nodes(cluster, 1)
# The node's token, as the client computed it from the secret and the node's sign.
token = cluster._cluster._nodes['127.0.0.1'].auth
def recv_exact(sock, n):
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the node closed the connection"
        data += chunk
    return data
with socket.create_connection(('127.0.0.1', 9701), timeout=10) as sock:
    msg = b'NODE_STATUS:'
    sock.sendall(token + struct.pack('>L', len(msg)) + msg)
    n = struct.unpack('>L', recv_exact(sock, 4))[0]
    status = pycos.deserialize(recv_exact(sock, n))
cluster.close()
report(keys=sorted(status), avail=describe(status['avail_info']))
''' % LO)
    assert "avail_info" in r["keys"] and "busy" in r["keys"], r
    assert_avail_info(r["avail"])
