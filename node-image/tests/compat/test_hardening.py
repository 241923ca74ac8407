"""The real dispy 4.15.2 client against a node that bounds what peers cost it but puts no
deadline on authenticated work: long setups and cleanups, large transfers, clients that die
mid-request, and jobs that look for the node's secret."""

import os
import signal
import time

LO = "host='127.0.0.1', loglevel=dispy.logger.WARNING"


def slow_setup_client(seconds):
    return '''
def setup(seconds):
    global loaded
    import time
    time.sleep(seconds)
    loaded = seconds
    return 0

def compute(n):
    return loaded + n

cluster = dispy.JobCluster(compute, setup=setup, %s,
                           nodes=[dispy.NodeAllocate('127.0.0.1', setup_args=(%r,))])
job = cluster.submit(1)
result = job()
report(result=result, status=job.status, finished=dispy.DispyJob.Finished, exception=job.exception)
cluster.close()
''' % (LO, seconds)


def test_a_setup_of_15_s_succeeds(nodes, client):
    nodes.start()
    r = client.run(slow_setup_client(15), timeout=120)
    assert (r["result"], r["status"]) == (16, r["finished"]), r


def test_a_setup_of_120_s_succeeds(nodes, client):
    nodes.start()
    r = client.run(slow_setup_client(120), timeout=300)
    assert (r["result"], r["status"]) == (121, r["finished"]), r


def test_a_close_with_a_slow_cleanup_runs_it_to_the_end_and_the_next_client_is_served(nodes, client, tmp_path):
    nodes.start()
    marker = tmp_path / "cleaned"
    client.run('''
def setup(marker):
    return 0

def cleanup(marker):
    import time
    time.sleep(14)
    open(marker, "w").write("done")

def compute():
    return 1

cluster = dispy.JobCluster(compute, setup=setup, cleanup=cleanup, %s,
                           nodes=[dispy.NodeAllocate('127.0.0.1', setup_args=(%r,))])
job = cluster.submit()
job()
cluster.close()
report(status=job.status)
''' % (LO, str(marker)), timeout=120)
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists() and marker.read_text() == "done", nodes.log()
    r = client.run('''
def compute(n):
    return n * 2
cluster = dispy.JobCluster(compute, %s, nodes=['127.0.0.1'])
report(result=cluster.submit(21)())
cluster.close()
''' % LO)
    assert r["result"] == 42


def test_a_200_mb_depends_file_arrives_whole(nodes, client, tmp_path):
    nodes.start()
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for i in range(200):
            f.write(bytes([i]) * (1 << 20))
    r = client.run('''
def compute():
    import hashlib
    h = hashlib.sha256()
    with open("big.bin", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return os.path.getsize("big.bin"), h.hexdigest()

cluster = dispy.JobCluster(compute, depends=["big.bin"], %s, nodes=['127.0.0.1'])
job = cluster.submit()
size, digest = job()
report(size=size, digest=digest, status=job.status, exception=job.exception)
cluster.close()
''' % LO, timeout=300)
    import hashlib
    h = hashlib.sha256()
    with open(big, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert (r["size"], r["digest"]) == (200 << 20, h.hexdigest()), r


def assert_the_next_client_is_served(nodes, client):
    """A new client's job runs on the node: no earlier client holds it."""
    r = client.run('''
def compute(n):
    return n + 1
cluster = dispy.JobCluster(compute, %s, nodes=['127.0.0.1'])
report(result=cluster.submit(1)())
cluster.close()
''' % LO, timeout=120)
    assert r["result"] == 2, nodes.log()


def partial_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".partial")]


def test_a_client_killed_mid_transfer_leaves_no_partial_file_and_frees_the_node(nodes, client, tmp_path):
    nodes.start()
    big = tmp_path / "huge.bin"
    with open(big, "wb") as f:
        f.truncate(400 << 20)
    proc = client.popen('''
def compute():
    return 1
cluster = dispy.JobCluster(compute, depends=["huge.bin"], %s, nodes=['127.0.0.1'])
cluster.submit()
time.sleep(600)
''' % LO)
    prefix = tmp_path / "node0"
    deadline = time.time() + 60
    while not partial_files(prefix) and time.time() < deadline:
        time.sleep(0.05)
    assert partial_files(prefix), "the transfer never started\n" + nodes.log()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while partial_files(prefix) and time.time() < deadline:
        time.sleep(0.1)
    assert not partial_files(prefix), partial_files(prefix)
    assert_the_next_client_is_served(nodes, client)


def test_a_client_killed_during_setup_frees_the_node(nodes, client, tmp_path):
    nodes.start()
    started = tmp_path / "setup-started"
    proc = client.popen('''
def setup(marker):
    import time
    open(marker, "w").write("x")
    time.sleep(4)
    return 0
def compute():
    return 1
cluster = dispy.JobCluster(compute, setup=setup, %s,
                           nodes=[dispy.NodeAllocate('127.0.0.1', setup_args=(%r,))])
time.sleep(600)
''' % (LO, str(started)))
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists(), nodes.log()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_the_next_client_is_served(nodes, client)
    # The abandoned setup runs to its end; then the node closes that computation.
    deadline = time.time() + 20
    while "hung up before its setup finished" not in nodes.log() and time.time() < deadline:
        time.sleep(0.2)
    assert "hung up before its setup finished" in nodes.log(), nodes.log()


def test_jobs_never_see_the_node_secret(nodes, client, tmp_path):
    nodes.start(env={"DISPYNODE_SECRET": "s3cret"})
    prog = tmp_path / "env.sh"
    prog.write_text("#!/bin/sh\nenv\n")
    prog.chmod(0o755)
    r = client.run('''
def compute():
    import os
    seen = {k: v for k, v in os.environ.items() if k.startswith("DISPYNODE_") or v == "s3cret"}
    try:
        parent = open("/proc/%%d/environ" %% os.getppid(), "rb").read()
    except OSError:
        parent = b""
    try:
        grand = open("/proc/%%d/environ" %% int(open("/proc/%%d/stat" %% os.getppid()).read().split()[3]), "rb").read()
    except (OSError, ValueError, IndexError):
        grand = b""
    return seen, b"s3cret" in parent, b"s3cret" in grand

cluster = dispy.JobCluster(compute, secret="s3cret", %s, nodes=['127.0.0.1'])
job = cluster.submit()
seen, in_parent, in_grand = job()
cluster.close()
program = dispy.JobCluster(%r, secret="s3cret", %s, nodes=['127.0.0.1'])
pjob = program.submit()
pjob()
program.close()
report(seen=seen, in_parent=in_parent, in_grand=in_grand, status=job.status, exception=job.exception,
       program_out=pjob.stdout.decode() if isinstance(pjob.stdout, bytes) else pjob.stdout)
''' % (LO, str(prog), LO))
    assert r["seen"] == {} and not r["in_parent"] and not r["in_grand"], r
    assert "s3cret" not in r["program_out"] and "DISPYNODE_" not in r["program_out"], r["program_out"]
    assert "PATH=" in r["program_out"]


def test_a_result_over_max_frame_is_terminated_and_the_next_job_finishes(nodes, client):
    nodes.start("127.0.0.1", "--max-frame", "4m", cpus=1)
    r = client.run('''
def compute(n):
    return b"x" * n

cluster = dispy.JobCluster(compute, %s, nodes=['127.0.0.1'])
big = cluster.submit(8 << 20)
big()
small = cluster.submit(3)
result = small()
report(big_status=big.status, big_exception=big.exception, big_result=big.result,
       small=result.decode(), small_status=small.status,
       terminated=dispy.DispyJob.Terminated, finished=dispy.DispyJob.Finished)
cluster.close()
''' % LO, timeout=120)
    assert r["big_status"] == r["terminated"] and r["big_result"] is None, r
    assert "--max-frame" in r["big_exception"], r
    assert (r["small"], r["small_status"]) == ("xxx", r["finished"]), r


def test_a_kept_job_connection_checks_every_requests_token_and_closes_on_a_wrong_one(nodes, client):
    """After an authorized JOB the node keeps the connection for the next request (our
    dispyscheduler's jobs), but each request must carry the node's token again: a wrong one
    is refused and the connection closed. The jobs are the dispy client's own JOB message,
    replayed with fresh uids."""
    nodes.start()
    r = client.run('''
import socket
import pycos
sent = []
send = dispy._Node.send
def recording(self, msg, *args, **kwargs):
    if msg.startswith(b"JOB:"):
        sent.append((self.auth, msg))
    return send(self, msg, *args, **kwargs)
dispy._Node.send = recording

def compute(n):
    return n

cluster = dispy.JobCluster(compute, %s, nodes=["127.0.0.1"])
first = cluster.submit(1)()
auth, msg = sent[0]
job = dispy.deserialize(msg[len(b"JOB:"):])

def request(s, token, uid):
    job.uid = uid
    s.sendall(token)
    s.send_msg(b"JOB:" + dispy.serialize(job))
    return s.recv_msg().decode()

raw = socket.create_connection(("127.0.0.1", 9701), timeout=10)
s = pycos.AsyncSocket(raw, blocking=True)  # dispy's own framing, synchronous
answers = [request(s, auth, job.uid + 1), request(s, auth, job.uid + 2),
           request(s, b"0" * 40, job.uid + 3)]
closed = raw.recv(1) == b""
report(first=first, answers=answers, closed=closed)
cluster.close()
''' % LO)
    assert r["first"] == 1
    assert r["answers"][:2] == ["ACK", "ACK"], r
    assert r["answers"][2].startswith("NAK (authentication failed"), r
    assert r["closed"], "the connection ends after the refusal"
    assert nodes.log().count("dispy client refused: JOB: authentication failed") == 1
