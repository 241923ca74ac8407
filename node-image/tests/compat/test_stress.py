"""Many trivial jobs: every result checked, no wrong status, no hang."""


def test_2000_trivial_jobs_ten_times(nodes, client):
    nodes.start()
    r = client.run('''
def compute(n):
    return n * n
cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], host='127.0.0.1', loglevel=dispy.logger.WARNING)
rounds = []
for r in range(10):
    t = time.time()
    jobs = [cluster.submit(i) for i in range(2000)]
    wrong = [i for i, j in enumerate(jobs) if j() != i * i or j.status != dispy.DispyJob.Finished]
    rounds.append([len(wrong), 2000 / (time.time() - t)])
cluster.close()
report(rounds=rounds)
''', timeout=600)
    print("jobs/s per round:", [round(x[1]) for x in r["rounds"]])
    assert [x[0] for x in r["rounds"]] == [0] * 10
