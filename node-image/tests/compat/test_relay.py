"""dispy's relay protocol across two subnets that meet only at the relay: the real dispy
4.15.2 client here (namespace C, the suite's own), a relay in namespace R on both subnets, our
dispynode in namespace N. R routes unicast between the subnets, so the client can reach a node
it learns of, but broadcasts stay on their subnet: the client hears of the node only through
the relay. The client names the relay in `nodes` (a TCP ping to it) and the node's subnet as a
pattern (dispy only uses nodes that match one of `nodes`)."""

import os
import subprocess
import sys
import time

import pytest

from conftest import client_env, result_of, sh, wait_port

RELAY = os.environ.get("DISPYNETRELAY", "")
R_NS, N_NS = "drelay-r-%d" % os.getpid(), "drelay-n-%d" % os.getpid()
CLIENT_IP = "10.79.0.1"
RELAY_CLIENT_SIDE, RELAY_NODE_SIDE = "10.79.0.2", "10.79.1.1"
NODE_IP = "10.79.1.2"
SECRET = "relay-test-secret"


@pytest.fixture(scope="module")
def subnets():
    """C (this namespace) 10.79.0.1/24 -- R 10.79.0.2/24 + 10.79.1.1/24 -- N 10.79.1.2/24."""
    assert RELAY and os.access(RELAY, os.X_OK), "set DISPYNETRELAY to the dispynetrelay binary"
    for ns in (R_NS, N_NS):
        sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", "drc", "type", "veth", "peer", "name", "drr", "netns", R_NS)
        sh("ip", "addr", "add", CLIENT_IP + "/24", "brd", "+", "dev", "drc")
        sh("ip", "link", "set", "drc", "up")
        sh("ip", "-n", R_NS, "link", "add", "drn", "type", "veth", "peer", "name", "dnr", "netns", N_NS)
        for ns, dev, addr in ((R_NS, "drr", RELAY_CLIENT_SIDE), (R_NS, "drn", RELAY_NODE_SIDE), (N_NS, "dnr", NODE_IP)):
            sh("ip", "-n", ns, "addr", "add", addr + "/24", "brd", "+", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "route", "add", "10.79.1.0/24", "via", RELAY_CLIENT_SIDE)
        sh("ip", "-n", N_NS, "route", "add", "10.79.0.0/24", "via", RELAY_NODE_SIDE)
        sh("ip", "netns", "exec", R_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield
    finally:
        subprocess.run(["ip", "link", "del", "drc"], capture_output=True)
        for ns in (R_NS, N_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Procs:
    def __init__(self, tmp_path):
        self.tmp_path, self.procs = tmp_path, []

    def start(self, name, ns, cmd):
        log = self.tmp_path / (name + ".log")
        proc = subprocess.Popen(["ip", "netns", "exec", ns] + cmd, stdin=subprocess.DEVNULL,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=client_env())
        proc.log_path = log
        self.procs.append(proc)
        return proc

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in self.procs:
            print("---- %s\n%s" % (p.log_path.name, p.log_path.read_text()[-4000:]))


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.stop()


def start_node(procs, tmp_path):
    # Not bound with -i: a node bound to its unicast address does not hear broadcasts.
    node = procs.start("node", N_NS, [os.environ["DISPYNODE"], "--daemon", "--cpus", "2",
                                      "--secret", SECRET, "--dest-path-prefix", str(tmp_path / "node")])
    wait_port(NODE_IP, 9701, node)  # through R
    return node


def wait_log(proc, text, timeout=15):
    deadline = time.time() + timeout
    while text not in proc.log_path.read_text():
        assert proc.poll() is None, "exited with %s:\n%s" % (proc.returncode, proc.log_path.read_text())
        assert time.time() < deadline, "no %r in:\n%s" % (text, proc.log_path.read_text())
        time.sleep(0.05)


CLIENT = '''
def compute(n):
    return dispy_node_ip_addr, n
cluster = dispy.JobCluster(compute, nodes=[%(relay)r, '10.79.1.*'], host=%(client)r,
                           secret=%(secret)r, loglevel=dispy.logger.WARNING)
jobs = [cluster.submit(i) for i in range(20)]
out = [list(j()) for j in jobs]
cluster.close()
report(out=out)
'''


def run_client(client, relay_addr):
    return client.run(CLIENT % {"relay": relay_addr, "client": CLIENT_IP, "secret": SECRET})


def test_a_dispy_client_that_names_our_relay_gets_results_from_a_node_on_another_subnet(subnets, procs, client, tmp_path):
    start_node(procs, tmp_path)
    relay = procs.start("relay", R_NS, [RELAY, "--daemon", "-s", SECRET])
    wait_log(relay, "dispynetrelay relaying")
    # The client names the relay's address on its own subnet; the relay relays on the other.
    r = run_client(client, RELAY_CLIENT_SIDE)
    assert r["out"] == [[NODE_IP, i] for i in range(20)]
    log = relay.log_path.read_text()
    assert "relaying a dispy client's ping" in log, log


def test_our_relay_with_another_secret_is_refused_by_the_client_and_relays_nothing(subnets, procs, client, tmp_path):
    start_node(procs, tmp_path)
    relay = procs.start("relay", R_NS, [RELAY, "--daemon", "-s", "not-the-clients"])
    wait_log(relay, "dispynetrelay relaying")
    r = client.run('''
def compute(n):
    return n
cluster = dispy.JobCluster(compute, nodes=[%r, '10.79.1.*'], host=%r, secret=%r,
                           loglevel=dispy.logger.WARNING)
time.sleep(4)
report(nodes=len(cluster.status().nodes))
cluster.close()
''' % (RELAY_CLIENT_SIDE, CLIENT_IP, SECRET))
    assert r["nodes"] == 0
    wait_log(relay, "the client refused RELAY_INFO")
    assert "relaying a dispy client's ping" not in relay.log_path.read_text()


def test_dispys_own_relay_brings_the_client_to_our_node(subnets, procs, client, tmp_path):
    start_node(procs, tmp_path)
    script = os.path.join(os.path.dirname(sys.executable), "dispynetrelay.py")
    # dispy's relay broadcasts on the subnet of the address a ping came to: the client names
    # its address on the nodes' subnet (reached through R's routing).
    relay = procs.start("dispy-relay", R_NS, [sys.executable, script, "--daemon", "-d", "-i", RELAY_NODE_SIDE,
                                              "-s", SECRET])
    wait_log(relay, "version:")
    r = run_client(client, RELAY_NODE_SIDE)
    assert r["out"] == [[NODE_IP, i] for i in range(20)]


def test_a_node_that_starts_after_the_client_is_announced_to_it_by_our_relay(subnets, procs, client, tmp_path):
    relay = procs.start("relay", R_NS, [RELAY, "--daemon", "-s", SECRET])
    wait_log(relay, "dispynetrelay relaying")
    proc = client.popen(CLIENT % {"relay": RELAY_CLIENT_SIDE, "client": CLIENT_IP, "secret": SECRET})
    try:
        # The client's ping is relayed while no node is up; the node's start-up announcement,
        # heard by the relay on the client port, is what brings the client to it.
        wait_log(relay, "relaying a dispy client's ping")
        start_node(procs, tmp_path)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    r = result_of(proc.returncode, out, err)
    assert r["out"] == [[NODE_IP, i] for i in range(20)]
    assert "forwarding a dispy node's announcement" in relay.log_path.read_text()
