"""Fixtures of the dispy compatibility suite: our `dispynode` (the binary in $DISPYNODE) and
the real dispy client from PyPI, each client in its own process (dispy's scheduler is a
process-wide singleton bound to port 9700).

The suite runs inside a private network namespace (see run.sh): dispy clients broadcast. A
second namespace joined by a veth pair is the "LAN" for discovery: the client is 10.77.0.1,
a node started with `lan=True` is 10.77.0.2."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

NODE = os.environ.get("DISPYNODE", "")
HERE = os.path.dirname(os.path.abspath(__file__))
LAN_NS = "dcompat-lan-%d" % os.getpid()
CLIENT_LAN_IP, NODE_LAN_IP = "10.77.0.1", "10.77.0.2"


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def private_network():
    """Refuses to run on the machine's real interfaces: this process must be in a namespace of
    its own, with only loopback."""
    links = [name for _, name in socket.if_nameindex()]
    assert set(links) <= {"lo"}, (
        "the dispy compatibility suite must run in a private network namespace (use run.sh); "
        "this one has %s" % links
    )
    assert NODE and os.access(NODE, os.X_OK), "set DISPYNODE to the dispynode binary"
    yield


@pytest.fixture(scope="session")
def lan():
    """A namespace for a node, joined to ours by a veth pair (broadcast reaches it)."""
    sh("ip", "netns", "add", LAN_NS)
    try:
        sh("ip", "link", "add", "dva", "type", "veth", "peer", "name", "dvb", "netns", LAN_NS)
        sh("ip", "addr", "add", CLIENT_LAN_IP + "/24", "brd", "+", "dev", "dva")
        sh("ip", "link", "set", "dva", "up")
        sh("ip", "-n", LAN_NS, "addr", "add", NODE_LAN_IP + "/24", "brd", "+", "dev", "dvb")
        sh("ip", "-n", LAN_NS, "link", "set", "dvb", "up")
        sh("ip", "-n", LAN_NS, "link", "set", "lo", "up")
        yield LAN_NS
    finally:
        subprocess.run(["ip", "netns", "del", LAN_NS], capture_output=True)


def wait_port(host, port, proc, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "dispynode exited with %s" % proc.returncode
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("dispynode did not listen on %s:%s" % (host, port))


class Nodes:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, host="127.0.0.1", *extra, cpus=2, lan=None, env=None, port=9701, args=None):
        """Starts our node; `args` replaces the whole command line after the binary."""
        n = len(self.procs)
        cmd = [NODE, "--daemon", "--cpus", str(cpus), "--dest-path-prefix", str(self.tmp_path / ("node%d" % n))]
        if host:
            cmd += ["-i", host]
        cmd += list(extra)
        if args is not None:
            cmd = [NODE] + list(args)
        if lan:
            cmd = ["ip", "netns", "exec", lan] + cmd
            host = NODE_LAN_IP
        log = open(self.tmp_path / ("node%d.log" % n), "w")
        proc_env = dict(os.environ, **(env or {}))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=proc_env)
        proc.log_path = self.tmp_path / ("node%d.log" % n)
        self.procs.append(proc)
        wait_port(host, port, proc)
        return proc

    def log(self, i=0):
        return self.procs[i].log_path.read_text()

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for i, p in enumerate(self.procs):
            print("---- node%d log\n%s" % (i, p.log_path.read_text()[-4000:]))


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path)
    yield n
    n.stop()


PROLOGUE = '''
import json, os, sys, time
import dispy
def report(**kw):
    print("RESULT " + json.dumps(kw), flush=True)
def wait_nodes(cluster, n, timeout=15):
    """Waits until n nodes have the computation set up (dispy's own scheduler state)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        # Both: dispy adds a cluster to a node's clusters before its own setup task puts the
        # node in the cluster's _dispy_nodes, which submit_node looks nodes up in.
        if sum(cluster in node.clusters and ip in cluster._dispy_nodes
               for ip, node in cluster._cluster._nodes.items()) >= n:
            return
        time.sleep(0.05)
    raise SystemExit("only %d of %d nodes set up" % (len(cluster.status().nodes), n))
'''


def client_env():
    env = dict(os.environ)
    # dispy 4.15.2 calls inspect.getargspec for job_status/cluster_status callbacks, which
    # Python 3.11 removed; the shim restores it for the client (the node is not involved).
    env["PYTHONPATH"] = os.path.join(HERE, "shim")
    return env


class Client:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.count = 0

    def script(self, source, name=None):
        self.count += 1
        path = self.tmp_path / (name or "client%d.py" % self.count)
        path.write_text(source)
        return path

    def popen(self, source, **kw):
        path = self.script(PROLOGUE + source)
        return subprocess.Popen([sys.executable, str(path)], cwd=self.tmp_path, env=client_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def run(self, source, timeout=90):
        """Runs a client; returns its report (the dict passed to report()) and its output."""
        proc = self.popen(source)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError("the dispy client hung (%ss)\n%s\n%s" % (timeout, out[-3000:], err[-5000:]))
        return result_of(proc.returncode, out, err)

    def run_file(self, path, args=(), timeout=120, stdin=None):
        proc = subprocess.run([sys.executable, str(path), *args], cwd=self.tmp_path, env=client_env(),
                              capture_output=True, text=True, timeout=timeout, input=stdin)
        assert proc.returncode == 0, "client failed (%s)\n%s\n%s" % (proc.returncode, proc.stdout[-3000:], proc.stderr[-5000:])
        return proc.stdout


def result_of(code, out, err):
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert code == 0 and lines, "client failed (%s)\nstdout:\n%s\nstderr:\n%s" % (code, out[-3000:], err[-6000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture
def client(tmp_path):
    return Client(tmp_path)
