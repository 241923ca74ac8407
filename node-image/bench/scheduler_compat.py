"""Our dispyscheduler versus dispy 4.15.2's dispyscheduler.py, in front of the same two of our
dispynode processes, with two dispy SharedJobCluster clients submitting JOBS trivial jobs each
at once: jobs/s (both clients' jobs over the wall time from the first submit to the last
result), wrong results, hangs. Prints; asserts nothing. Run by scheduler_compat.sh inside a
private network namespace.

With SCHED_CPU=F (a fraction of one core, e.g. 0.25), each scheduler runs in a cgroup (v1 cpu
controller) capped at F of a core: the run is then bound by the scheduler, as on a cluster whose
nodes and clients are other machines, instead of by the nodes' job processes sharing this
machine's cores with it.

   python scheduler_compat.py DISPYNODE DISPYSCHEDULER [JOBS] [RUNS]"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

CLIENT = r'''
import sys, time
import dispy
def compute(n):
    return n * n
port, n = int(sys.argv[1]), int(sys.argv[2])
cluster = dispy.SharedJobCluster(compute, scheduler_host="127.0.0.3", host="127.0.0.1",
                                 ip_addr="127.0.0.1", client_port=port,
                                 recover_file="recover%d" % port, loglevel=dispy.logger.CRITICAL)
for j in [cluster.submit(i) for i in range(20)]:
    j()
t0 = time.time()
jobs = [cluster.submit(i) for i in range(n)]
submitted = time.time()
wrong = sum(1 for i, j in enumerate(jobs) if j() != i * i or j.status != dispy.DispyJob.Finished)
t1 = time.time()
print("RESULT %f %f %d %f %f" % (t0, t1, wrong, time.process_time(), submitted), flush=True)
cluster.close()
'''


def wait_port(host, port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def cpu_seconds(pid):
    """User + system time of a process so far."""
    try:
        fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def tree_cpu_seconds(pid):
    """CPU seconds of a process, of the children it has waited for, and of its living
    children (a node's Python hosts and their job processes)."""
    try:
        fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        total = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open("/proc/%s/stat" % child).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid:
            total += tree_cpu_seconds(int(child))
    return total


CGROUP_CPU = "/sys/fs/cgroup/cpu"


def cap_cpu(pid, fraction):
    """Moves process `pid` (all its threads) into a fresh cgroup allowed `fraction` of one core
    (in 10 ms periods, so that a throttled scheduler waits milliseconds, not a tenth of a second);
    returns the cgroup's path, to remove once the process is gone."""
    path = os.path.join(CGROUP_CPU, "dispy-bench-%d" % pid)
    os.mkdir(path)
    period = 10000
    for name, value in (("cpu.cfs_period_us", period), ("cpu.cfs_quota_us", int(period * fraction)),
                        ("cgroup.procs", pid)):
        with open(os.path.join(path, name), "w") as f:
            f.write(str(value))
    return path


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(label, sched_cmd, node_bin, jobs, work, sched_cpu):
    nodes = [subprocess.Popen([node_bin, "--daemon", "--cpus", "2", "-i", ip, "--dest-path-prefix",
                               os.path.join(work, "node-" + ip)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for ip in ("127.0.0.1", "127.0.0.2")]
    for ip in ("127.0.0.1", "127.0.0.2"):
        wait_port(ip, 9701)
    sched = subprocess.Popen(sched_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    cgroup = cap_cpu(sched.pid, sched_cpu) if sched_cpu else None
    try:
        if not wait_port("127.0.0.3", 9702):
            print("%-22s scheduler did not start" % label)
            return
        time.sleep(1.0)
        path = os.path.join(work, "client.py")
        with open(path, "w") as f:
            f.write(CLIENT)
        clients = [subprocess.Popen([sys.executable, path, str(port), str(jobs)], cwd=work,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                   for port in (9700, 9710)]
        rows, hung = [], 0
        for c in clients:
            try:
                out, _ = c.communicate(timeout=600)
                line = [l for l in out.splitlines() if l.startswith("RESULT ")]
                rows.append(tuple(float(x) for x in line[-1].split()[1:])) if line else None
                hung += 0 if line else 1
            except subprocess.TimeoutExpired:
                c.kill()
                c.communicate()
                hung += 1
        cpu = cpu_seconds(sched.pid)
        node_cpu = sum(tree_cpu_seconds(n.pid) for n in nodes)
        if len(rows) == 2:
            wall = max(r[1] for r in rows) - min(r[0] for r in rows)
            wrong = int(sum(r[2] for r in rows))
            client_cpu = sum(r[3] for r in rows)
            submitting = max(r[4] for r in rows) - min(r[0] for r in rows)
            print("%-22s %8.0f jobs/s  %d wrong  %d hung  (%d jobs in %.1fs, submitted in %.1fs; cpu: "
                  "scheduler %.1fs, clients %.1fs, nodes %.1fs)" % (
                      label, 2 * jobs / wall, wrong, hung, 2 * jobs, wall, submitting, cpu,
                      client_cpu, node_cpu), flush=True)
        else:
            print("%-22s %d of 2 clients hung" % (label, hung), flush=True)
    finally:
        stop(sched)
        for n in nodes:
            stop(n)
        if cgroup:
            os.rmdir(cgroup)


def main():
    node_bin, sched_bin = sys.argv[1], sys.argv[2]
    jobs = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    sched_cpu = float(os.environ.get("SCHED_CPU") or 0)
    if sched_cpu:
        print("== each scheduler capped at %.2f of a core" % sched_cpu, flush=True)
    py_sched = os.path.join(os.path.dirname(sys.executable), "dispyscheduler.py")
    for i in range(runs):
        for label, cmd in (
            ("ours", [sched_bin, "--daemon", "-i", "127.0.0.3", "-n", "127.0.0.1", "-n", "127.0.0.2"]),
            ("dispyscheduler.py", [sys.executable, py_sched, "--daemon", "-i", "127.0.0.3",
                                   "-n", "127.0.0.1", "-n", "127.0.0.2"]),
        ):
            with tempfile.TemporaryDirectory() as work:
                if label.startswith("dispy"):
                    cmd = cmd + ["--dest_path_prefix", os.path.join(work, "sched")]
                run("%s #%d" % (label, i + 1), cmd, node_bin, jobs, work, sched_cpu)


if __name__ == "__main__":
    main()
