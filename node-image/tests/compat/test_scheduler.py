"""Our dispyscheduler ($DISPYSCHEDULER) with the real dispy 4.15.2 SharedJobCluster client,
in front of our dispynode processes (and dispy's own dispynode.py).

Layout on loopback: nodes at 127.0.0.1 and 127.0.0.2 (port 9701), the scheduler at
127.0.0.3 (9700 for nodes, 9702 for clients), clients at 127.0.0.1 on ports 9700, 9710, ...
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import result_of, wait_port

SCHEDULER = os.environ.get("DISPYSCHEDULER", "")
SCHED_IP = "127.0.0.3"


class Scheduler:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.proc = None

    def start(self, *extra, nodes=("127.0.0.1", "127.0.0.2"), env=None):
        assert SCHEDULER and os.access(SCHEDULER, os.X_OK), "set DISPYSCHEDULER to the dispyscheduler binary"
        cmd = [SCHEDULER, "--daemon", "-i", SCHED_IP, "--dest_path_prefix", str(self.tmp_path / "sched")]
        for n in nodes:
            cmd += ["-n", n]
        cmd += list(extra)
        self.log_path = self.tmp_path / "scheduler.log"
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, RUST_LOG="info", **(env or {})))
        wait_port(SCHED_IP, 9702, self.proc)
        return self.proc

    def log(self):
        return self.log_path.read_text()

    def wait_log(self, text, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log():
                return
            time.sleep(0.1)
        raise AssertionError("scheduler log has no %r:\n%s" % (text, self.log()[-4000:]))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            print("---- scheduler log\n%s" % self.log()[-6000:])


@pytest.fixture
def scheduler(tmp_path):
    s = Scheduler(tmp_path)
    yield s
    s.stop()


def shared(port, extra=""):
    """The SharedJobCluster arguments of the client on `port`."""
    return ("scheduler_host=%r, host='127.0.0.1', ip_addr='127.0.0.1', client_port=%d, recover_file='recover%d', "
            "loglevel=dispy.logger.WARNING%s" % (SCHED_IP, port, port, extra))


def wait_all(procs, timeout=120):
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            raise AssertionError("client hung\n%s\n%s" % (o[-3000:], e[-5000:]))
        out.append(result_of(p.returncode, o, e))
    return out


SQUARES = '''
def compute(n, tag):
    import time
    time.sleep(0.05)
    return [tag, n * n, dispy_node_ip_addr]
cluster = dispy.SharedJobCluster(compute, %s)
jobs = [cluster.submit(i, %r) for i in range(%d)]
out = []
for j in jobs:
    r = j()
    out.append([j.status, r, j.exception])
cluster.close()
report(out=out, finished=dispy.DispyJob.Finished)
'''


def test_two_shared_clients_at_once_on_two_nodes_every_result_right(nodes, client, scheduler):
    nodes.start("127.0.0.1")
    nodes.start("127.0.0.2")
    scheduler.start()
    procs = [client.popen(SQUARES % (shared(port), tag, 30)) for port, tag in ((9700, "a"), (9710, "b"))]
    ra, rb = wait_all(procs)
    for r, tag in ((ra, "a"), (rb, "b")):
        assert [o[0] for o in r["out"]] == [r["finished"]] * 30, r["out"]
        assert [o[1][:2] for o in r["out"]] == [[tag, i * i] for i in range(30)]
    used = {o[1][2] for r in (ra, rb) for o in r["out"]}
    assert used == {"127.0.0.1", "127.0.0.2"}, "both nodes ran jobs"


def test_wrong_cluster_secret_refused_with_a_clear_error(nodes, client, scheduler):
    nodes.start("127.0.0.1")
    scheduler.start("--cluster_secret", "right", nodes=("127.0.0.1",))
    proc = client.popen('''
def compute(n):
    return n
try:
    cluster = dispy.SharedJobCluster(compute, secret="wrong", %s)
    report(error=None)
except Exception as e:
    report(error=str(e))
''' % shared(9700))
    (r,) = wait_all([proc], timeout=60)
    assert "cluster_secret" in (r["error"] or ""), r
    assert "does not prove the cluster secret" in scheduler.log()
    # The right secret works with the same scheduler.
    (r,) = wait_all([client.popen('''
def compute(n):
    return n + 1
cluster = dispy.SharedJobCluster(compute, secret="right", %s)
out = [cluster.submit(i)() for i in range(3)]
cluster.close()
report(out=out)
''' % shared(9700))])
    assert r["out"] == [1, 2, 3]


def test_wrong_node_secret_node_not_used_and_logged(nodes, client, scheduler):
    nodes.start("127.0.0.1", "--secret", "node-right")
    nodes.start("127.0.0.2", "--secret", "node-wrong")
    scheduler.start("--node_secret", "node-right")
    scheduler.wait_log("does not prove the node secret")
    (r,) = wait_all([client.popen('''
def compute(n):
    return dispy_node_ip_addr
cluster = dispy.SharedJobCluster(compute, %s)
out = [cluster.submit(i)() for i in range(6)]
cluster.close()
report(out=out)
''' % shared(9700))])
    assert r["out"] == ["127.0.0.1"] * 6
    assert "node 127.0.0.2 ignored: its PONG does not prove the node secret" in scheduler.log()
