"""Bare Python baselines on this machine, to read the node's figures against:
fork-per-job (fork, child writes a result to a pipe and exits, parent reaps, up to 2 children
alive) and a pipe round trip to a reused worker."""
import os
import sys
import time


def fork_per_job(n):
    r, w = os.pipe()
    live = 0
    t = time.perf_counter()
    for i in range(n):
        while live >= 2:
            os.waitpid(-1, 0)
            live -= 1
        if os.fork() == 0:
            os.write(w, b"%d" % (i * i))
            os._exit(0)
        live += 1
        os.read(r, 64)
    while live:
        os.waitpid(-1, 0)
        live -= 1
    return n / (time.perf_counter() - t)


def reused_worker(n):
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(a_w)
        while True:
            data = os.read(a_r, 64)
            if not data:
                os._exit(0)
            os.write(b_w, b"%d" % (int(data) ** 2))
    t = time.perf_counter()
    for i in range(n):
        os.write(a_w, b"%d" % i)
        os.read(b_r, 64)
    rate = n / (time.perf_counter() - t)
    os.close(a_w)
    os.waitpid(pid, 0)
    return rate


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print("baseline  bare Python fork-per-job loop (python3 -S)   %8.0f jobs/s" % fork_per_job(n))
    print("baseline  bare pipe round trip to one reused worker     %8.0f jobs/s" % reused_worker(n * 10))
