"""dispy 4.15.2's own node (dispynode.py) versus our dispynode, with the same dispy client and
the same 2,000 trivial jobs, side by side. Prints; asserts nothing. Run by dispy_compat.sh
inside a private network namespace (both nodes broadcast).

   python dispy_compat.py DISPYNODE [JOBS] [RUNS]"""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

CLIENT = r'''
import sys, time
import dispy
def compute(n):
    return n * n
n = int(sys.argv[1])
cluster = dispy.JobCluster(compute, nodes=["127.0.0.1"], host="127.0.0.1", loglevel=dispy.logger.CRITICAL)
for j in [cluster.submit(i) for i in range(20)]:
    j()
t = time.perf_counter()
jobs = [cluster.submit(i) for i in range(n)]
wrong = sum(1 for i, j in enumerate(jobs) if j() != i * i or j.status != dispy.DispyJob.Finished)
dt = time.perf_counter() - t
print("RESULT %f %d" % (n / dt, wrong), flush=True)
cluster.close()
'''


def tree_rss_kb(pid):
    """RSS of a process and all its descendants."""
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open("/proc/%d/status" % p):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def run(label, node_cmd, jobs, work):
    node = subprocess.Popen(node_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work,
                            start_new_session=True)
    time.sleep(2.0)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_kb(node.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    script = os.path.join(work, "client.py")
    open(script, "w").write(CLIENT)
    client = subprocess.Popen([sys.executable, script, str(jobs)], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = client.communicate(timeout=max(60, jobs / 10))
        line = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if line:
            rate, wrong = line[-1].split()[1:]
            outcome = "%8.0f jobs/s  %4d wrong  hung: no " % (float(rate), int(wrong))
        else:
            outcome = "   client failed (exit %s)             " % client.returncode
    except subprocess.TimeoutExpired:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()
        outcome = "       -        -       hung: YES"
    stop.set()
    sampler.join()
    os.killpg(node.pid, signal.SIGKILL)
    node.wait()
    print("%-34s %d jobs: %s  node RSS peak %6.1f MB (process tree)" % (label, jobs, outcome, peak[0] / 1024), flush=True)


def main():
    ours, jobs, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000, int(sys.argv[3]) if len(sys.argv) > 3 else 3
    reference = os.path.join(os.path.dirname(sys.executable), "dispynode.py")
    for i in range(runs):
        for label, cmd in [
            ("dispy 4.15.2 dispynode.py", [sys.executable, reference, "-i", "127.0.0.1", "--clean", "--daemon"]),
            ("our dispynode (release)", [ours, "-i", "127.0.0.1", "--daemon"]),
        ]:
            with tempfile.TemporaryDirectory() as work:
                if "dispynode.py" in cmd[1]:
                    cmd = cmd + ["--dest_path_prefix", os.path.join(work, "node")]
                else:
                    cmd = cmd + ["--dest-path-prefix", os.path.join(work, "node")]
                run(label, cmd, jobs, work)


if __name__ == "__main__":
    main()
