"""Our dispynode started the way dispynode.py is: its command line, its configuration file."""

import os
import subprocess
import sys


def test_dispynode_py_command_line_is_accepted_and_dash_p_is_dispys_base_port(nodes, client, tmp_path):
    prefix = tmp_path / "d"
    node = nodes.start(port=9801, args=[
        "-i", "127.0.0.1", "-c", "2", "-p", "9800", "--dest_path_prefix", str(prefix),
        "--zombie_interval", "1", "--max_file_size", "10M", "--ping_interval", "10",
        "--msg_timeout", "10", "--name", "n1", "-s", "s3cret", "--admin_secret", "adm",
        "--force_cleanup", "--client_shutdown", "--serve", "100", "--clean", "--daemon"])
    r = client.run('''
def compute(n):
    return dispy_node_name, n * n
cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], host='127.0.0.1', dispy_port=9800,
                           secret='s3cret', loglevel=dispy.logger.WARNING)
jobs = [cluster.submit(i) for i in range(4)]
report(results=[list(j()) for j in jobs])
cluster.close()
''')
    assert r["results"] == [["n1", i * i] for i in range(4)]
    log = nodes.log()
    assert "--client_shutdown: no client can shut this node down" in log, log
    assert node.poll() is None


def test_a_configuration_saved_by_dispynode_py_starts_our_node(nodes, client, tmp_path):
    saved = tmp_path / "node.conf"
    dispynode_py = os.path.join(os.path.dirname(sys.executable), "dispynode.py")
    subprocess.run([sys.executable, dispynode_py, "--save_config", str(saved), "-i", "127.0.0.1",
                    "-c", "1", "-p", "9800", "--name", "from-py", "-s", "s3cret",
                    "--dest_path_prefix", str(tmp_path / "p"), "--daemon"],
                   check=True, capture_output=True, timeout=60)
    assert "from-py" in saved.read_text()
    nodes.start(port=9801, args=["--config", str(saved)])
    r = client.run('''
def compute():
    return dispy_node_name
cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], host='127.0.0.1', dispy_port=9800,
                           secret='s3cret', loglevel=dispy.logger.WARNING)
report(name=cluster.submit()())
cluster.close()
''')
    assert r["name"] == "from-py"


def admin_request(auth, msg):
    """One request to the node the way dispyadmin.py sends it: auth prefix, one frame."""
    import socket
    import struct
    s = socket.create_connection(("127.0.0.1", 9701), timeout=10)
    try:
        s.sendall(auth + struct.pack(">L", len(msg)) + msg)
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        (n,) = struct.unpack(">L", head)
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
        return body
    finally:
        s.close()


def test_dispyadmin_messages_set_cpus_and_a_service_window_the_node_keeps(nodes, client, tmp_path):
    import hashlib
    import pickle
    import time
    nodes.start("127.0.0.1", "--admin_secret", "adm", "-s", "s3cret")
    sign = admin_request(b"x" * 40, b"NODE_INFO:" + pickle.dumps({"sign": "admin"}))
    assert len(sign) == 40, sign
    admin = hashlib.sha1(b"adm" + sign).hexdigest().encode()
    info = pickle.loads(admin_request(admin, b"NODE_INFO:" + pickle.dumps({"sign": "admin"})))
    assert info["max_cpus"] == 2 and info["name"], info
    # The node's own token (any client's) is not the admin's.
    token = hashlib.sha1(b"s3cret" + sign).hexdigest().encode()
    assert pickle.loads(admin_request(token, b"SET_CPUS:" + pickle.dumps({"cpus": 1}))) == -1
    assert pickle.loads(admin_request(admin, b"SET_CPUS:" + pickle.dumps({"cpus": 1}))) == {"cpus": 1}
    assert pickle.loads(admin_request(admin, b"NODE_INFO:" + pickle.dumps({})))["cpus"] == 1

    ready, closed, opened = tmp_path / "ready", tmp_path / "closed", tmp_path / "opened"
    proc = client.popen('''
def compute():
    return 7
def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.05)
cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], host='127.0.0.1', secret='s3cret',
                           loglevel=dispy.logger.WARNING)
wait_nodes(cluster, 1)
open(%r, "w").close()
wait_for(%r)
job = cluster.submit()
wait_for(%r)
result = job()
report(result=result, start=job.start_time, status=job.status)
cluster.close()
''' % (str(ready), str(closed), str(opened)))
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), nodes.log()
    later = time.localtime(time.time() + 3600)
    start = "%02d:%02d" % (later.tm_hour, later.tm_min)
    window = pickle.loads(admin_request(admin, b"SERVICE_TIME:" + pickle.dumps({"control": "start_time", "time": start})))
    assert window["service_start"] is not None, window
    later = time.localtime(time.time() + 7200)
    end = "%02d:%02d" % (later.tm_hour, later.tm_min)
    admin_request(admin, b"SERVICE_TIME:" + pickle.dumps({"control": "end_time", "time": end}))
    closed.touch()
    time.sleep(3)
    status = pickle.loads(admin_request(admin, b"NODE_STATUS:"))
    assert status["busy"] == 0, status
    opened_at = time.time()
    for control in ("start_time", "end_time"):
        admin_request(admin, b"SERVICE_TIME:" + pickle.dumps({"control": control, "time": "0"}))
    opened.touch()
    out, err = proc.communicate(timeout=60)
    from conftest import result_of
    r = result_of(proc.returncode, out, err)
    assert r["result"] == 7 and r["start"] >= opened_at - 1, (r, opened_at)


DEST_PATH_CLIENT = '''
def compute():
    seen = os.path.exists("left-by-job")
    open("left-by-job", "w").write("x")
    return seen, os.getcwd()
cluster = dispy.JobCluster(compute, depends=["data.bin"], dest_path="keep", cleanup=False,
                           nodes=['127.0.0.1'], host='127.0.0.1', loglevel=dispy.logger.WARNING)
seen, cwd = cluster.submit()()
report(seen=seen, cwd=cwd)
cluster.close()
'''


def test_dest_path_keeps_files_for_the_next_run_which_skips_sending_them(nodes, client, tmp_path):
    nodes.start()
    (tmp_path / "data.bin").write_bytes(b"d" * (5 << 20))
    first = client.run(DEST_PATH_CLIENT)
    kept = tmp_path / "node0" / "127.0.0.1" / "keep" / "data.bin"
    inode = os.stat(kept).st_ino
    second = client.run(DEST_PATH_CLIENT)
    assert first["cwd"] == second["cwd"] == str(kept.parent), (first, second)
    assert (first["seen"], second["seen"]) == (False, True)
    assert os.stat(kept).st_ino == inode, "the kept file was sent again"


def test_force_cleanup_removes_a_dest_path_the_client_asked_to_keep(nodes, client, tmp_path):
    nodes.start("127.0.0.1", "--force_cleanup")
    (tmp_path / "data.bin").write_bytes(b"d" * 1024)
    first = client.run(DEST_PATH_CLIENT)
    second = client.run(DEST_PATH_CLIENT)
    assert (first["seen"], second["seen"]) == (False, False)
    assert not (tmp_path / "node0" / "127.0.0.1" / "keep").exists()


def test_jobs_log_with_dispynode_logger_into_the_node_log(nodes, client):
    nodes.start()
    r = client.run('''
def compute(n):
    dispynode_logger.info("job %d says hello", n)
    return time.time() > 0
cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], host='127.0.0.1', loglevel=dispy.logger.WARNING)
report(result=cluster.submit(5)())
cluster.close()
''')
    assert r["result"] is True
    assert "job 5 says hello" in nodes.log(), nodes.log()
