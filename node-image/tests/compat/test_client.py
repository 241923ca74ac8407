"""The real dispy 4.15.2 client against our dispynode: each feature a client program uses."""

import os
import signal
import subprocess
import threading
import time

LO = "nodes=['127.0.0.1'], host='127.0.0.1', loglevel=dispy.logger.WARNING"


def test_function_result_stdout_stderr_and_times(nodes, client):
    nodes.start()
    r = client.run('''
def compute(n):
    import sys
    print("out", n)
    sys.stderr.write("err %%d\\n" %% n)
    return {"n": n, "sq": n * n, "big": 2 ** 70, "node": dispy_node_ip_addr}
cluster = dispy.JobCluster(compute, %s)
jobs = [cluster.submit(i) for i in range(8)]
out = []
for j in jobs:
    j()
    out.append([j.result, j.status, j.stdout, j.stderr, j.exception, j.start_time <= j.end_time, j.ip_addr])
cluster.close()
report(out=out, finished=dispy.DispyJob.Finished)
''' % LO)
    for i, (res, status, out, err, exc, ordered, ip) in enumerate(r["out"]):
        assert res == {"n": i, "sq": i * i, "big": 2 ** 70, "node": "127.0.0.1"}
        assert status == r["finished"]
        assert (out, err, exc) == ("out %d\n" % i, "err %d\n" % i, None)
        assert ordered and ip == "127.0.0.1"


def test_setup_cleanup_depends_and_instances(nodes, client, tmp_path):
    nodes.start()
    (tmp_path / "words.txt").write_text("alpha beta gamma beta\n")
    marker = tmp_path / "cleanup-ran"
    r = client.run('''
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

def scale(p, k):
    return Point(p.x * k, p.y * k)

def setup(path, marker):
    global words
    words = open(path).read().split()
    return 0

def cleanup(path, marker):
    open(marker, "w").write("%%d words" %% len(words))

def compute(word, p):
    words.append("changed")  # a job's changes to globals do not leak into other jobs
    return words.count(word), scale(p, 2), len(words)

cluster = dispy.JobCluster(compute, depends=["words.txt", Point, scale], setup=setup,
                           cleanup=cleanup, host='127.0.0.1', loglevel=dispy.logger.WARNING,
                           nodes=[dispy.NodeAllocate('127.0.0.1', setup_args=('words.txt', %r))])
jobs = [cluster.submit(w, Point(i, -i)) for i, w in enumerate(["beta", "alpha", "delta"])]
out = []
for j in jobs:
    count, p, n = j()
    assert j.status == dispy.DispyJob.Finished, j.exception
    out.append([count, type(p).__name__, p.x, p.y, n])
cluster.close()
report(out=out)
''' % str(marker))
    assert r["out"] == [[2, "Point", 0, 0, 5], [1, "Point", 2, -2, 5], [0, "Point", 4, -4, 5]]
    assert marker.read_text() == "4 words"


def test_setup_failure_is_reported_and_node_unused(nodes, client):
    nodes.start()
    r = client.run('''
def setup():
    return 5
def compute(n):
    return n
cluster = dispy.JobCluster(compute, setup=setup, %s)
job = cluster.submit(1)
done = cluster.wait(timeout=4)
report(done=done, status=job.status, created=dispy.DispyJob.Created)
cluster.close(timeout=2, terminate=True)
''' % LO)
    assert r["done"] is False and r["status"] == r["created"]
    assert "returned 5" in nodes.log()


def test_program_computation(nodes, client, tmp_path):
    nodes.start()
    prog = tmp_path / "prog.sh"
    prog.write_text("#!/bin/sh\necho \"args: $*\"\necho oops >&2\nexit $1\n")
    prog.chmod(0o755)
    r = client.run('''
cluster = dispy.JobCluster(%r, %s)
jobs = [cluster.submit(code, "x y") for code in (0, 3)]
out = []
for j in jobs:
    j()
    out.append([j.result, j.status, j.stdout.decode(), j.stderr.decode(), type(j.stdout).__name__])
cluster.close()
report(out=out, finished=dispy.DispyJob.Finished)
''' % (str(prog), LO))
    f = r["finished"]
    assert r["out"] == [[0, f, "args: 0 x y\n", "oops\n", "bytes"], [3, f, "args: 3 x y\n", "oops\n", "bytes"]]


def test_submit_node_pins_jobs(nodes, client):
    nodes.start("127.0.0.1")
    nodes.start("127.0.0.2")
    r = client.run('''
def compute(n):
    return dispy_node_ip_addr
cluster = dispy.JobCluster(compute, nodes=['127.0.0.1', '127.0.0.2'], host='127.0.0.1',
                           loglevel=dispy.logger.WARNING)
wait_nodes(cluster, 2)
jobs = [cluster.submit_node(ip, i) for i in range(6) for ip in ('127.0.0.2', '127.0.0.1')]
out = [[j(), j.ip_addr] for j in jobs]
cluster.close()
report(out=out)
''')
    assert r["out"] == [[ip, ip] for _ in range(6) for ip in ("127.0.0.2", "127.0.0.1")]


def test_dispy_job_depends(nodes, client, tmp_path):
    nodes.start()
    for i in range(3):
        (tmp_path / ("in%d.txt" % i)).write_text("x" * (i + 1) * 1000)
    r = client.run('''
def weight(s):
    return len(s) * 2
def compute(name):
    return weight(open(name).read()), os.path.exists(name)
cluster = dispy.JobCluster(compute, %s)
jobs = [cluster.submit("in%%d.txt" %% i, dispy_job_depends=["in%%d.txt" %% i, weight]) for i in range(3)]
out = [list(j()) for j in jobs]
time.sleep(0.5)
cluster.close()
report(out=out)
''' % LO)
    assert r["out"] == [[2000, True], [4000, True], [6000, True]]


def test_cancel_running_job(nodes, client):
    nodes.start()
    r = client.run('''
def compute(n):
    import time
    time.sleep(n)
    return n
cluster = dispy.JobCluster(compute, %s)
long, short = cluster.submit(60), cluster.submit(0.2)
deadline = time.time() + 10
while long.status != dispy.DispyJob.Running and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
t = time.time()
cancelled = cluster.cancel(long)
long()
took = time.time() - t
short()
cluster.close()
report(cancelled=cancelled, status=long.status, took=took, short=[short.result, short.status],
       terminated=dispy.DispyJob.Terminated, finished=dispy.DispyJob.Finished)
''' % LO)
    assert r["cancelled"] == 0 and r["status"] == r["terminated"] and r["took"] < 10
    assert r["short"] == [0.2, r["finished"]]


def test_job_that_raises(nodes, client):
    nodes.start()
    r = client.run('''
def compute(n):
    print("before")
    raise ValueError("bad input %%d" %% n)
cluster = dispy.JobCluster(compute, %s)
j = cluster.submit(7)
j()
cluster.close()
report(result=j.result, status=j.status, exception=j.exception, stdout=j.stdout,
       terminated=dispy.DispyJob.Terminated)
''' % LO)
    assert r["status"] == r["terminated"] and r["result"] is None
    assert "ValueError: bad input 7" in r["exception"] and "Traceback" in r["exception"]
    assert r["stdout"] == "before\n"


def test_reentrant_jobs_finish_on_second_node_when_one_is_killed(nodes, client):
    doomed = nodes.start("127.0.0.1", cpus=1)
    nodes.start("127.0.0.2", cpus=1)
    proc = client.popen('''
def compute(n):
    import time
    time.sleep(2)
    return (dispy_node_ip_addr, n)
cluster = dispy.JobCluster(compute, nodes=['127.0.0.1', '127.0.0.2'], host='127.0.0.1',
                           reentrant=True, pulse_interval=1, loglevel=dispy.logger.WARNING)
wait_nodes(cluster, 2)
jobs = [cluster.submit(i) for i in range(4)]
print("SUBMITTED", flush=True)
out = [[list(j()), j.status] for j in jobs]
cluster.close(timeout=5, terminate=True)
report(out=out, finished=dispy.DispyJob.Finished)
''')
    assert proc.stdout.readline().startswith("SUBMITTED")
    time.sleep(1.0)  # both nodes now run a job
    doomed.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=90)
    from conftest import result_of
    r = result_of(proc.returncode, "SUBMITTED\n" + out, err)
    assert [o[1] for o in r["out"]] == [r["finished"]] * 4
    assert sorted(o[0][1] for o in r["out"]) == [0, 1, 2, 3]
    assert {o[0][0] for o in r["out"]} == {"127.0.0.2"}, "every job finished on the live node"


def test_wrong_secret_finds_no_node(nodes, client):
    nodes.start("127.0.0.1", "--secret", "right")
    r = client.run('''
def compute(n):
    return n
cluster = dispy.JobCluster(compute, secret="wrong", %s)
j = cluster.submit(1)
done = cluster.wait(timeout=4)
report(done=done, nodes=len(cluster.status().nodes), status=j.status, created=dispy.DispyJob.Created)
cluster.close(timeout=1, terminate=True)
''' % LO)
    assert r == {"done": False, "nodes": 0, "status": r["created"], "created": r["created"]}
    assert "dispy computation registered" not in nodes.log()


def test_right_secret_and_a_forged_request_refused(nodes, client):
    nodes.start("127.0.0.1", "--secret", "right")
    r = client.run('''
import socket, struct
def compute(n):
    return n + 1
cluster = dispy.JobCluster(compute, secret="right", %s)
ok = cluster.submit(1)()
# A request with a made-up auth prefix gets a clear refusal and the node keeps serving.
s = socket.create_connection(("127.0.0.1", 9701))
msg = b"COMPUTE:" + b"not a pickle"
s.sendall(b"0" * 40 + struct.pack(">L", len(msg)) + msg)
n = struct.unpack(">L", s.recv(4))[0]
refusal = s.recv(n).decode()
s = socket.create_connection(("127.0.0.1", 9701))
s.sendall(b"x" * 40 + struct.pack(">L", 11) + b"PING:\\x80\\x05junk")
s.close()
again = cluster.submit(2)()
cluster.close()
report(ok=ok, again=again, refusal=refusal)
''' % LO)
    assert r["ok"] == 2 and r["again"] == 3
    assert "authentication failed" in r["refusal"]


def test_tls(nodes, client, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=dispy-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    nodes.start("127.0.0.1", "--certfile", str(cert), "--keyfile", str(key))
    r = client.run('''
def compute(n):
    dispy_provisional_result(n * 10)
    return n * n
cluster = dispy.JobCluster(compute, certfile=%r, keyfile=%r, %s)
jobs = [cluster.submit(i) for i in range(5)]
out = [j() for j in jobs]
cluster.close()
report(out=out)
''' % (str(cert), str(key), LO))
    assert r["out"] == [0, 1, 4, 9, 16]
    # A plain-text client gets nothing from a TLS node.
    r = client.run('''
def compute(n):
    return n
cluster = dispy.JobCluster(compute, %s)
j = cluster.submit(1)
report(done=cluster.wait(timeout=3))
cluster.close(timeout=1, terminate=True)
''' % LO)
    assert r["done"] is False
    assert "plain-text dispy client refused" in nodes.log()


def test_discovery_by_broadcast(nodes, client, lan):
    nodes.start(None, lan=lan)
    r = client.run('''
def compute(n):
    return dispy_node_ip_addr, n
cluster = dispy.JobCluster(compute, nodes=['*'], host='10.77.0.1', loglevel=dispy.logger.WARNING)
out = [list(cluster.submit(i)()) for i in range(4)]
cluster.close()
report(out=out)
''')
    assert r["out"] == [["10.77.0.2", i] for i in range(4)]


def test_provisional_results_and_send_file(nodes, client, tmp_path):
    nodes.start()
    r = client.run('''
seen = []
def status(job):
    if job.status == dispy.DispyJob.ProvisionalResult:
        seen.append(job.result)
def compute(n):
    for i in range(3):
        dispy_provisional_result(("step", i))
    with open("out%%d.txt" %% n, "w") as f:
        f.write("made on the node %%d" %% n)
    sent = dispy_send_file("out%%d.txt" %% n)
    return sent
cluster = dispy.JobCluster(compute, job_status=status, %s)
j = cluster.submit(5)
j()
time.sleep(0.3)
cluster.close()
report(result=j.result, seen=seen, file=open("out5.txt").read())
''' % LO)
    assert r["result"] == 0
    assert r["seen"] == [["step", 0], ["step", 1], ["step", 2]]
    assert r["file"] == "made on the node 5"


def test_node_status_jobs_and_retrieve(nodes, client):
    """JOBS, PENDING_JOBS, RETRIEVE_JOB and NODE_STATUS as the client's own methods use them."""
    nodes.start()
    r = client.run('''
def compute(n):
    import time
    time.sleep(n)
    return n
cluster = dispy.JobCluster(compute, %s)
wait_nodes(cluster, 1)
j = cluster.submit(1.5)
while j.status != dispy.DispyJob.Running:
    time.sleep(0.05)
on_node = cluster.node_jobs('127.0.0.1', from_node=True)
j()
cluster.close()
report(on_node=len(on_node), result=j.result)
''' % LO)
    assert r == {"on_node": 1, "result": 1.5}


def test_resetup_node_runs_setup_again_with_fresh_globals(nodes, client):
    nodes.start()
    r = client.run('''
class Allocate(dispy.NodeAllocate):
    calls = 0
    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=''):
        Allocate.calls += 1
        self.setup_args = (Allocate.calls,)
        return cpus

def setup(n):
    global loaded, touched
    loaded, touched = n, False
    return 0

def compute():
    global touched
    was = touched
    touched = True  # a fork per job: never seen by the next job, nor by a new setup
    return loaded, was

cluster = dispy.JobCluster(compute, setup=setup, %s, nodes=[Allocate('127.0.0.1')])
before = cluster.submit()()
cluster.wait()
cluster.resetup_node('127.0.0.1')
# resetup_node returns at once (its work is a pycos task): a job submitted before the node
# was allocated again could still go to the old setup, so wait for the new allocation.
deadline = time.time() + 30
while Allocate.calls < 2 and time.time() < deadline:
    time.sleep(0.01)
after = cluster.submit()()
report(before=list(before), after=list(after), calls=Allocate.calls)
cluster.close()
''' % "host='127.0.0.1', loglevel=dispy.logger.WARNING")
    assert r["before"] == [1, False] and r["after"] == [2, False], r
    assert r["calls"] == 2
    assert "closed for its client's new setup" in nodes.log()
