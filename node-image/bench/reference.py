"""The reference: dispy 4.15's own client and node (from PyPI), trivial jobs on loopback.
Run inside a private network namespace (dispynode broadcasts at start)."""
import sys
import time

import dispy


def compute(n):
    return n * n


if __name__ == "__main__":
    n = int(sys.argv[1])
    cluster = dispy.JobCluster(compute, nodes=["127.0.0.1"], host="127.0.0.1", loglevel=dispy.logger.WARNING)
    time.sleep(1.0)  # let the node be discovered and set up
    warm = [cluster.submit(i) for i in range(20)]
    for j in warm:
        j()
    t = time.perf_counter()
    jobs = [cluster.submit(i) for i in range(n)]
    wrong = 0
    for i, j in enumerate(jobs):
        if j() != i * i or j.status != dispy.DispyJob.Finished:
            wrong += 1
    dt = time.perf_counter() - t
    print("reference dispy 4.15.2 dispynode.py + JobCluster        %8.0f jobs/s  (%d of %d jobs wrong)" % (n / dt, wrong, n))
    cluster.close()
