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
