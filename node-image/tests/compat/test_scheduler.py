"""Our dispyscheduler ($DISPYSCHEDULER) with the real dispy 4.15.2 SharedJobCluster client,
in front of our dispynode processes (and dispy's own dispynode.py).

Layout on loopback: nodes at 127.0.0.1 and 127.0.0.2 (port 9701), the scheduler at
127.0.0.3 (9700 for nodes, 9702 for clients), clients at 127.0.0.1 on ports 9700, 9710, ...
"""

import hashlib
import json
import os
import re
import pickle
import socket
import struct
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


@pytest.fixture
def spawn(client):
    """Starts client scripts; whatever is still running at the end of the test is killed
    (a client holds its port)."""
    procs = []

    def start(source):
        p = client.popen(source)
        procs.append(p)
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def wait_line(proc, marker, timeout=30):
    """Reads the client's stdout up to a line starting with `marker` (dispy logs to stdout)."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(marker):
            return "".join(seen)
        seen.append(line)
    raise AssertionError("client never printed %r:\n%s\n%s" % (marker, "".join(seen), proc.stderr.read()[-3000:] if proc.poll() is not None else ""))


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


def test_two_shared_clients_at_once_on_two_nodes_every_result_right(nodes, spawn, scheduler):
    nodes.start("127.0.0.1")
    nodes.start("127.0.0.2")
    scheduler.start()
    procs = [spawn(SQUARES % (shared(port), tag, 30)) for port, tag in ((9700, "a"), (9710, "b"))]
    ra, rb = wait_all(procs)
    for r, tag in ((ra, "a"), (rb, "b")):
        assert [o[0] for o in r["out"]] == [r["finished"]] * 30, r["out"]
        assert [o[1][:2] for o in r["out"]] == [[tag, i * i] for i in range(30)]
    used = {o[1][2] for r in (ra, rb) for o in r["out"]}
    assert used == {"127.0.0.1", "127.0.0.2"}, "both nodes ran jobs"


def test_wrong_cluster_secret_refused_with_a_clear_error(nodes, spawn, scheduler):
    nodes.start("127.0.0.1")
    scheduler.start("--cluster_secret", "right", nodes=("127.0.0.1",))
    proc = spawn('''
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
    (r,) = wait_all([spawn('''
def compute(n):
    return n + 1
cluster = dispy.SharedJobCluster(compute, secret="right", %s)
out = [cluster.submit(i)() for i in range(3)]
cluster.close()
report(out=out)
''' % shared(9700))])
    assert r["out"] == [1, 2, 3]


def test_wrong_node_secret_node_not_used_and_logged(nodes, spawn, scheduler):
    nodes.start("127.0.0.1", "--secret", "node-right")
    nodes.start("127.0.0.2", "--secret", "node-wrong")
    scheduler.start("--node_secret", "node-right")
    scheduler.wait_log("does not prove the node secret")
    (r,) = wait_all([spawn('''
def compute(n):
    return dispy_node_ip_addr
cluster = dispy.SharedJobCluster(compute, %s)
out = [cluster.submit(i)() for i in range(6)]
cluster.close()
report(out=out)
''' % shared(9700))])
    assert r["out"] == ["127.0.0.1"] * 6
    assert "node 127.0.0.2 ignored: its PONG does not prove the node secret" in scheduler.log()


def test_cancel_of_a_queued_and_of_a_running_job(nodes, spawn, scheduler):
    nodes.start("127.0.0.1", cpus=1)
    scheduler.start(nodes=("127.0.0.1",))
    (r,) = wait_all([spawn('''
def compute(n):
    import time
    time.sleep(n)
    return n
cluster = dispy.SharedJobCluster(compute, %s)
long = cluster.submit(60)
deadline = time.time() + 15
while long.status != dispy.DispyJob.Running and time.time() < deadline:
    time.sleep(0.05)
queued = cluster.submit(0.1)
time.sleep(0.5)
cancelled_queued = cluster.cancel(queued)
queued()
t = time.time()
cancelled_running = cluster.cancel(long)
long()
took = time.time() - t
after = cluster.submit(0.2)
after()
cluster.close()
report(cq=cancelled_queued, cr=cancelled_running, queued=queued.status, long=long.status,
       took=took, after=[after.result, after.status], C=dispy.DispyJob.Cancelled,
       T=dispy.DispyJob.Terminated, F=dispy.DispyJob.Finished)
''' % shared(9700))])
    assert r["cq"] == 0 and r["queued"] == r["C"], r
    assert r["cr"] == 0 and r["long"] == r["T"] and r["took"] < 10, r
    assert r["after"] == [0.2, r["F"]], "the node's cpu is free again"


def test_reentrant_jobs_finish_on_the_other_node_when_one_is_sigkilled(nodes, spawn, scheduler):
    doomed = nodes.start("127.0.0.1", cpus=1)
    nodes.start("127.0.0.2", cpus=1)
    scheduler.start("--pulse_interval", "0.5")
    proc = spawn('''
def compute(n):
    import time
    time.sleep(2)
    return [dispy_node_ip_addr, n]
cluster = dispy.SharedJobCluster(compute, reentrant=True, %s)
jobs = [cluster.submit(i) for i in range(4)]
deadline = time.time() + 15
while sum(j.status == dispy.DispyJob.Running for j in jobs) < 2 and time.time() < deadline:
    time.sleep(0.05)
print("RUNNING", flush=True)
out = [[j(), j.status] for j in jobs]
cluster.close()
report(out=out, finished=dispy.DispyJob.Finished)
''' % shared(9700))
    wait_line(proc, "RUNNING")
    time.sleep(0.5)
    doomed.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=90)
    r = result_of(proc.returncode, out, err)
    assert [o[1] for o in r["out"]] == [r["finished"]] * 4, r
    assert sorted(o[0][1] for o in r["out"]) == [0, 1, 2, 3]
    assert {o[0][0] for o in r["out"]} == {"127.0.0.2"}, "every job finished on the live node"


def test_a_node_restarted_at_its_address_runs_the_next_jobs_though_its_kept_connections_died(
        nodes, spawn, scheduler, tmp_path):
    """The scheduler keeps a connection to our node for its next job; when the node process is
    replaced, the kept connections are dead: the next job finds that out and goes on a new
    connection to the new process."""
    old = nodes.start("127.0.0.1", cpus=1)
    scheduler.start("--metrics-addr", "127.0.0.3:9790", "--ping_interval", "1", nodes=("127.0.0.1",))
    go = tmp_path / "go"
    proc = spawn('''
def compute(n):
    return [n, os.getpid()]
cluster = dispy.SharedJobCluster(compute, %s)
before = [cluster.submit(i)() for i in range(3)]
print("BEFORE", flush=True)
while not os.path.exists(%r):
    time.sleep(0.05)
after = [cluster.submit(i)() for i in range(3, 6)]
cluster.close()
report(before=before, after=after)
''' % (shared(9700), str(go)))
    wait_line(proc, "BEFORE")
    old.send_signal(signal.SIGTERM)
    old.wait(15)
    nodes.start("127.0.0.1", cpus=1)
    deadline = time.time() + 15
    while scheduler.log().count("node found") < 2 and time.time() < deadline:
        time.sleep(0.1)
    go.touch()
    out, err = proc.communicate(timeout=90)
    r = result_of(proc.returncode, out, err)
    assert [o[0] for o in r["before"] + r["after"]] == list(range(6)), r
    import urllib.request
    text = urllib.request.urlopen("http://127.0.0.3:9790/metrics", timeout=5).read().decode()
    # One connection each way per node process; the jobs after the first on each, and their
    # replies, were on kept ones.
    assert sent_on(text) == {"new": 2, "kept": 4}, text
    assert sent_on(text, "job_replies_received") == {"new": 2, "kept": 4}, text


def test_a_node_unreachable_for_a_moment_is_set_up_afresh_once_found_again(nodes, spawn, scheduler, tmp_path):
    """A node that does not answer is dropped, with the computation still on it; found again
    (same process), it refuses a second COMPUTE of it: the scheduler closes it there and sets it
    up again, and the client's jobs run."""
    node = nodes.start("127.0.0.1", cpus=1)
    scheduler.start("--msg_timeout", "2", "--ping_interval", "1", nodes=("127.0.0.1",))
    go = tmp_path / "go"
    proc = spawn('''
def compute(n):
    return n
cluster = dispy.SharedJobCluster(compute, %s)
before = cluster.submit(0)()
print("BEFORE", flush=True)
while not os.path.exists(%r):
    time.sleep(0.05)
after = []
for i in range(1, 4):
    job = cluster.submit(i)
    after.append([job(), job.status])
cluster.close()
report(before=before, after=after, abandoned=dispy.DispyJob.Abandoned, finished=dispy.DispyJob.Finished)
''' % (shared(9700), str(go)))
    wait_line(proc, "BEFORE")
    node.send_signal(signal.SIGSTOP)
    try:
        go.touch()
        scheduler.wait_log("node unreachable, dropping it", timeout=20)
    finally:
        node.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=90)
    r = result_of(proc.returncode, out, err)
    # The job sent while the node did not answer is given up (not reentrant); the next ones
    # run on the node set up afresh.
    assert r["before"] == 0
    assert r["after"] == [[None, r["abandoned"]], [2, r["finished"]], [3, r["finished"]]], r
    assert "closing it there and setting it up again" in scheduler.log()


def test_a_client_killed_without_close_loses_its_computation_after_the_zombie_interval(
        nodes, spawn, scheduler):
    nodes.start("127.0.0.1", cpus=1)
    # 0.05 minutes: 3 s; clients pulse every 0.6 s.
    scheduler.start("--zombie_interval", "0.05", nodes=("127.0.0.1",))
    doomed = spawn('''
def compute(n):
    import time
    time.sleep(n)
    return n
cluster = dispy.SharedJobCluster(compute, %s)
job = cluster.submit(120)
deadline = time.time() + 15
while job.status != dispy.DispyJob.Running and time.time() < deadline:
    time.sleep(0.05)
print("RUNNING", flush=True)
time.sleep(300)
''' % shared(9700))
    wait_line(doomed, "RUNNING")
    other = spawn('''
def compute(n):
    return n * 2
cluster = dispy.SharedJobCluster(compute, %s)
t = time.time()
out = [cluster.submit(i)() for i in range(5)]
waited = time.time() - t
cluster.close()
report(out=out, waited=waited)
''' % shared(9710))
    time.sleep(1.0)
    doomed.kill()
    doomed.communicate()
    (r,) = wait_all([other], timeout=60)
    # The only cpu was the killed client's until its computation was closed (its job
    # terminated); then the other client's jobs ran.
    assert r["out"] == [0, 2, 4, 6, 8]
    assert 2.0 < r["waited"] < 30, r
    assert "its client silent for the zombie interval" in scheduler.log()


def test_exclusive_computation_has_the_nodes_alone(nodes, spawn, scheduler, tmp_path):
    nodes.start("127.0.0.1")
    nodes.start("127.0.0.2")
    scheduler.start()
    first = spawn('''
def compute(n):
    import time
    time.sleep(0.5)
    return dispy_node_ip_addr
cluster = dispy.SharedJobCluster(compute, exclusive=True, %s)
print("SCHEDULED", flush=True)
out = [j() for j in [cluster.submit(i) for i in range(8)]]
closed = time.time()
cluster.close()
report(out=out, closed=closed)
''' % shared(9700))
    wait_line(first, "SCHEDULED")
    second = spawn('''
def compute(n):
    return n
cluster = dispy.SharedJobCluster(compute, %s)
scheduled = time.time()
out = [cluster.submit(i)() for i in range(3)]
cluster.close()
report(out=out, scheduled=scheduled)
''' % shared(9710))
    out, err = first.communicate(timeout=60)
    r1 = result_of(first.returncode, "SCHEDULED\n" + out, err)
    (r2,) = wait_all([second])
    assert sorted(set(r1["out"])) == ["127.0.0.1", "127.0.0.2"]
    assert r2["out"] == [0, 1, 2]
    assert r2["scheduled"] >= r1["closed"], "the second computation waited for the exclusive one"


ORDER = '''
def compute(tag, i):
    import time
    start = time.time()
    time.sleep(0.4)
    return [tag, i, start]
cluster = dispy.SharedJobCluster(compute, %s)
print("SCHEDULED", flush=True)
deadline = time.time() + 15
while "127.0.0.1" not in cluster._dispy_nodes and time.time() < deadline:
    time.sleep(0.02)  # the scheduler's NODE_STATUS: set up on the node
%s
jobs = [cluster.submit(%r, i) for i in range(5)]
open(%r, "w").close()
out = [j() for j in jobs]
cluster.close()
report(out=out)
'''


@pytest.mark.parametrize("flag,expected", [
    (None, "BBBBBAAAAA"),
    ("--early_cluster_scheduler", "BAAAAABBBB"),
    ("--fair_cluster_scheduler", "BABABABABA"),
])
def test_job_order_by_scheduler_policy(nodes, spawn, scheduler, flag, expected):
    """Cluster A is created first, B submits first (while A waits), one cpu: the default
    runs the earliest-submitted job, early_cluster A's jobs (created first), fair alternates."""
    nodes.start("127.0.0.1", cpus=1)
    scheduler.start(*([flag] if flag else []), nodes=("127.0.0.1",))
    wait_b = 'while not os.path.exists("b.done"):\n    time.sleep(0.01)'
    a = spawn(ORDER % (shared(9700), wait_b, "A", "a.done"))
    wait_line(a, "SCHEDULED")
    b = spawn(ORDER % (shared(9710), "", "B", "b.done"))
    out_a, err_a = a.communicate(timeout=60)
    ra = result_of(a.returncode, out_a, err_a)
    (rb,) = wait_all([b])
    runs = sorted(ra["out"] + rb["out"], key=lambda o: o[2])
    assert "".join(o[0] for o in runs) == expected


def test_tls_to_clients_and_to_nodes(nodes, spawn, scheduler, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=dispy-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    nodes.start("127.0.0.1", "--certfile", str(cert), "--keyfile", str(key))
    scheduler.start("--node_certfile", str(cert), "--node_keyfile", str(key),
                    "--cluster_certfile", str(cert), "--cluster_keyfile", str(key),
                    nodes=("127.0.0.1",))
    (r,) = wait_all([spawn('''
def compute(n):
    return n * n
cluster = dispy.SharedJobCluster(compute, certfile=%r, keyfile=%r, %s)
out = [j() for j in [cluster.submit(i) for i in range(5)]]
cluster.close()
report(out=out)
''' % (str(cert), str(key), shared(9700)))], timeout=60)
    assert r["out"] == [0, 1, 4, 9, 16]


def test_dispys_own_dispynode_py_as_a_node(nodes, spawn, scheduler, tmp_path):
    dispynode_py = os.path.join(os.path.dirname(sys.executable), "dispynode.py")
    log = open(tmp_path / "dispynode_py.log", "w")
    node = subprocess.Popen([sys.executable, dispynode_py, "-i", "127.0.0.2", "--cpus", "2", "--daemon",
                             "--clean", "--dest_path_prefix", str(tmp_path / "pynode")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_port("127.0.0.2", 9701, node, timeout=30)
        nodes.start("127.0.0.1")
        scheduler.start("--metrics-addr", "127.0.0.3:9790")
        procs = [spawn(SQUARES % (shared(port), tag, 12)) for port, tag in ((9700, "a"), (9710, "b"))]
        ra, rb = wait_all(procs)
        for r, tag in ((ra, "a"), (rb, "b")):
            assert [o[1][:2] for o in r["out"]] == [[tag, i * i] for i in range(12)]
        used = [o[1][2] for r in (ra, rb) for o in r["out"]]
        assert "127.0.0.2" in used, "dispynode.py ran jobs"
        # dispynode.py answers one request per connection: each of its jobs came on a new one.
        import urllib.request
        text = urllib.request.urlopen("http://127.0.0.3:9790/metrics", timeout=5).read().decode()
        assert sent_on(text).get("new", 0) >= used.count("127.0.0.2"), text
    finally:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        print("---- dispynode.py log\n%s" % (tmp_path / "dispynode_py.log").read_text()[-4000:])


def test_depends_and_job_depends_reach_the_nodes_through_the_scheduler(nodes, spawn, scheduler, tmp_path):
    (tmp_path / "words.txt").write_text("alpha beta beta\n")
    (tmp_path / "extra.txt").write_text("gamma\n")
    nodes.start("127.0.0.1")
    nodes.start("127.0.0.2")
    scheduler.start()
    (r,) = wait_all([spawn('''
def compute(word, name):
    with open("words.txt") as f:
        text = f.read()
    with open(name) as f:
        extra = f.read().strip()
    return [text.count(word), extra]
cluster = dispy.SharedJobCluster(compute, depends=["words.txt"], %s)
jobs = [cluster.submit(w, "extra.txt", dispy_job_depends=["extra.txt"])
        for w in ["alpha", "beta", "delta", "beta"]]
out = [j() for j in jobs]
exc = [j.exception for j in jobs]
cluster.close()
report(out=out, exc=exc)
''' % shared(9700))])
    assert r["out"] == [[1, "gamma"], [2, "gamma"], [0, "gamma"], [2, "gamma"]], r


def test_a_program_computation_is_sent_to_the_nodes(nodes, spawn, scheduler, tmp_path):
    prog = tmp_path / "show.sh"
    prog.write_text("#!/bin/sh\necho \"args: $*\"\nexit $1\n")
    prog.chmod(0o755)
    nodes.start("127.0.0.1")
    scheduler.start(nodes=("127.0.0.1",))
    (r,) = wait_all([spawn('''
cluster = dispy.SharedJobCluster("show.sh", %s)
jobs = [cluster.submit(i, "x y") for i in range(3)]
out = [[j(), j.stdout.decode()] for j in jobs]
cluster.close()
report(out=out)
''' % shared(9700))])
    assert r["out"] == [[i, "args: %d x y\n" % i] for i in range(3)]


def test_a_file_over_max_file_size_is_refused(nodes, spawn, scheduler, tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    nodes.start("127.0.0.1")
    scheduler.start("--max_file_size", "4k", nodes=("127.0.0.1",))
    (r,) = wait_all([spawn('''
def compute(n):
    return n
try:
    cluster = dispy.SharedJobCluster(compute, depends=["big.bin"], %s)
    report(error=None)
except Exception as e:
    report(error=str(e))
''' % shared(9700))], timeout=60)
    assert "max_file_size" in (r["error"] or ""), r


def _frame(b):
    return struct.pack(">L", len(b)) + b


def _recv_frame(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    n = struct.unpack(">L", head)[0]
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _client_hello():
    s = socket.create_connection((SCHED_IP, 9702), timeout=5)
    s.sendall(b"x" * 40 + _frame(b"CLIENT:" + pickle.dumps(
        {"version": "4.15.2", "ip_addr": None, "scheduler_ip_addr": SCHED_IP})))
    reply = pickle.loads(_recv_frame(s))
    s.close()
    return reply


def test_a_peer_without_the_secrets_learns_only_the_public_sign_and_is_bounded(nodes, spawn, scheduler):
    nodes.start("127.0.0.1")
    scheduler.start("--cluster_secret", "right", nodes=("127.0.0.1",))
    hello = _client_hello()
    assert sorted(hello) == ["ip_addr", "port", "sign", "version"] and hello["port"] == 9702
    # A request without the auth gets nothing; a COMPUTE gets why.
    s = socket.create_connection((SCHED_IP, 9702), timeout=5)
    s.sendall(b"y" * 40 + _frame(b"NODE_JOBS:" + pickle.dumps({"compute_id": 1, "auth": "a"})))
    assert _recv_frame(s) is None
    s.close()
    # A large frame before authentication is not read: the connection is closed.
    s = socket.create_connection((SCHED_IP, 9702), timeout=5)
    s.sendall(b"y" * 40 + struct.pack(">L", 1 << 30) + b"COMPUTE:" + b"z" * 4096)
    try:
        s.sendall(b"z" * (4 << 20))
        answer = _recv_frame(s)
    except OSError:
        answer = None
    s.close()
    assert answer is None or b"wrong secret" in answer
    # To the node-facing port, a large message from an address that is not a node in use.
    s = socket.create_connection((SCHED_IP, 9700), timeout=5, source_address=("127.0.0.9", 0))
    try:
        s.sendall(_frame(b"JOB_REPLY:" + b"q" * (1 << 20)))
    except OSError:
        pass
    s.close()
    # A forged reply for a job that is not running is ignored, and acknowledged as dispy does.
    s = socket.create_connection((SCHED_IP, 9700), timeout=5)
    s.sendall(_frame(b"JOB_REPLY:" + _job_reply(uid=12345, hash="forged", ip_addr="127.0.0.1", status=11)))
    assert _recv_frame(s) == b"ACK"
    s.close()
    # A pickle that would grow past the budget, from an authenticated client.
    auth = hashlib.sha1(("right" + hello["sign"]).encode()).hexdigest().encode()
    inner = [b"x" * 1000] * 1000
    bomb = pickle.dumps({"compute": [inner] * 100, "node_allocs": [], "exclusive": False})
    assert len(bomb) < 64 * 1024
    s = socket.create_connection((SCHED_IP, 9702), timeout=5)
    s.sendall(auth + _frame(b"COMPUTE:" + bomb))
    refusal = pickle.loads(_recv_frame(s))
    s.close()
    assert "too large" in refusal or "budget" in refusal, refusal
    log = scheduler.log()
    assert "not a node in use" in log
    assert "stale, or forged" in log
    # The scheduler still serves a real client.
    (r,) = wait_all([spawn('''
def compute(n):
    return n * 3
cluster = dispy.SharedJobCluster(compute, secret="right", %s)
out = [cluster.submit(i)() for i in range(3)]
cluster.close()
report(out=out)
''' % shared(9700))])
    assert r["out"] == [0, 3, 6]


def _job_reply(**state):
    """A pickled dispy._JobReply with this state, as a node sends it."""
    body = pickle.dumps(state, protocol=2)
    return b"\x80\x02cdispy\n_JobReply\n)\x81" + body[2:-1] + b"b."


def sent_on(metrics_text, name="jobs_sent"):
    """dispyscheduler_jobs_sent_total (or another counter by connection) by connection
    ("new", "kept")."""
    pattern = r'^dispyscheduler_%s_total\{connection="(\w+)"\} (\d+)$' % name
    return {kind: int(n) for kind, n in re.findall(pattern, metrics_text, re.M)}


def test_metrics_and_json_logs(nodes, spawn, scheduler):
    nodes.start("127.0.0.1")
    scheduler.start("--metrics-addr", "127.0.0.3:9790", "--log_format", "json", nodes=("127.0.0.1",))
    (r,) = wait_all([spawn('''
def compute(n):
    return n
cluster = dispy.SharedJobCluster(compute, %s)
out = [cluster.submit(i)() for i in range(4)]
cluster.close()
report(out=out)
''' % shared(9700))])
    assert r["out"] == [0, 1, 2, 3]
    import urllib.request
    text = urllib.request.urlopen("http://127.0.0.3:9790/metrics", timeout=5).read().decode()
    assert "dispyscheduler_jobs_submitted_total 4" in text, text
    assert 'dispyscheduler_job_results_total{status="Finished"} 4' in text, text
    # Our node keeps a job's connection for the next, and we keep its replies': one
    # connection each way for the four jobs.
    assert sent_on(text) == {"new": 1, "kept": 3}, text
    assert sent_on(text, "job_replies_received") == {"new": 1, "kept": 3}, text
    lines = [json.loads(l) for l in scheduler.log().splitlines() if l.startswith("{")]
    assert any(l.get("fields", {}).get("message") == "node found" for l in lines)


def test_allocate_deallocate_and_close_node_from_a_shared_client(nodes, spawn, scheduler):
    nodes.start("127.0.0.1")
    nodes.start("127.0.0.2")
    scheduler.start()
    (r,) = wait_all([spawn('''
def compute(n):
    return dispy_node_ip_addr
cluster = dispy.SharedJobCluster(compute, nodes=["127.0.0.1"], %s)
first = [cluster.submit(i)() for i in range(4)]
allocated = cluster.allocate_node("127.0.0.2")
deadline = time.time() + 15
while "127.0.0.2" not in cluster._dispy_nodes and time.time() < deadline:
    time.sleep(0.05)
deallocated = cluster.deallocate_node("127.0.0.1")
second = [cluster.submit(i)() for i in range(4)]
closed = cluster.close_node("127.0.0.1")
unknown = cluster.deallocate_node("127.0.0.9")
cluster.close()
report(first=first, second=second, allocated=allocated, deallocated=deallocated,
       closed=closed, unknown=unknown)
''' % shared(9700))])
    assert r["first"] == ["127.0.0.1"] * 4
    assert r["second"] == ["127.0.0.2"] * 4
    assert (r["allocated"], r["deallocated"], r["closed"], r["unknown"]) == (0, 0, 0, -1), r
    deadline = time.time() + 10
    while "dispy computation closed by its client" not in nodes.log(0) and time.time() < deadline:
        time.sleep(0.1)
    assert "dispy computation closed by its client" in nodes.log(0)


def test_provisional_results_and_dispy_send_file_reach_the_shared_client(nodes, spawn, scheduler):
    nodes.start("127.0.0.1")
    scheduler.start(nodes=("127.0.0.1",))
    (r,) = wait_all([spawn('''
seen = []
def status(job):
    if job.status == dispy.DispyJob.ProvisionalResult:
        seen.append(job.result)
def compute(n):
    for i in range(3):
        dispy_provisional_result(("step", i))
    with open("out%%d.txt" %% n, "w") as f:
        f.write("made on the node %%d" %% n)
    return dispy_send_file("out%%d.txt" %% n)
cluster = dispy.SharedJobCluster(compute, job_status=status, %s)
j = cluster.submit(5)
j()
time.sleep(0.3)
cluster.close()
report(result=j.result, seen=seen, file=open("out5.txt").read())
''' % shared(9700))])
    assert r["result"] == 0
    assert r["seen"] == [["step", 0], ["step", 1], ["step", 2]]
    assert r["file"] == "made on the node 5"


def test_sigterm_ends_jobs_terminated_closes_computations_on_nodes_and_exits_0(nodes, spawn, scheduler):
    nodes.start("127.0.0.1", cpus=1)
    scheduler.start(nodes=("127.0.0.1",))
    proc = spawn('''
def compute(n):
    import time
    time.sleep(n)
    return n
cluster = dispy.SharedJobCluster(compute, %s)
job = cluster.submit(120)
deadline = time.time() + 15
while job.status != dispy.DispyJob.Running and time.time() < deadline:
    time.sleep(0.05)
print("RUNNING", flush=True)
job()
report(status=job.status, terminated=dispy.DispyJob.Terminated)
''' % shared(9700))
    wait_line(proc, "RUNNING")
    t = time.time()
    scheduler.proc.send_signal(signal.SIGTERM)
    assert scheduler.proc.wait(20) == 0
    assert time.time() - t < 15
    assert "dispy computation closed by its client" in nodes.log(0)
    assert "computation closed on node" in scheduler.log()
    out, err = proc.communicate(timeout=30)
    r = result_of(proc.returncode, out, err)
    assert r["status"] == r["terminated"], "the client was told before the scheduler left"
