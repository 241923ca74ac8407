"""Creates N DispyJobs j0..j(N-1) of JobCluster CLUSTER in namespace NS (job i's args: [i]),
each already Finished (its status written the way the operator writes it: server-side apply,
field manager dispy-operator), straight to the API server named by $KUBECONFIG, from THREADS
connections. With --created-only they are only created, for the operator to run.

    python3 load_jobs.py NS CLUSTER N [THREADS] [--created-only]

Only the standard library: the kubeconfig's server and its inline certificates are read with
regular expressions (the e2e cluster writes them one per line)."""

import base64
import http.client
import json
import os
import re
import ssl
import sys
import tempfile
import threading
import time


def connection_factory():
    text = open(os.environ["KUBECONFIG"]).read()

    def field(name):
        m = re.search(r"^\s*%s:\s*(\S+)" % re.escape(name), text, re.M)
        if not m:
            sys.exit("kubeconfig: no %s" % name)
        return m.group(1)

    server = re.match(r"https://([^:/]+):(\d+)", field("server"))
    tmp = tempfile.mkdtemp()
    paths = {}
    for name in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
        paths[name] = os.path.join(tmp, name)
        with open(paths[name], "wb") as f:
            f.write(base64.b64decode(field(name)))
    context = ssl.create_default_context(cafile=paths["certificate-authority-data"])
    context.load_cert_chain(paths["client-certificate-data"], paths["client-key-data"])
    host, port = server.group(1), int(server.group(2))
    return lambda: http.client.HTTPSConnection(host, port, context=context, timeout=60)


def status(i, node):
    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "status": "Finished",
        "node": node,
        "pod": "trivial-node-%d" % (i % 2),
        "attempts": 1,
        "result": i,
        "startTime": t,
        "endTime": t,
        "conditions": [
            {"type": "Complete", "status": "True", "reason": "Finished",
             "message": "on %s" % node, "lastTransitionTime": t},
            {"type": "Failed", "status": "False", "reason": "Finished",
             "message": "on %s" % node, "lastTransitionTime": t},
        ],
    }


def main():
    created_only = "--created-only" in sys.argv
    argv = [a for a in sys.argv if a != "--created-only"]
    ns, cluster, n = argv[1], argv[2], int(argv[3])
    threads = int(argv[4]) if len(argv) > 4 else 8
    connect = connection_factory()
    base = "/apis/dispy.io/v1alpha1/namespaces/%s/dispyjobs" % ns
    failures = []

    def send(conn, method, path, body, content_type):
        conn.request(method, path, body=json.dumps(body), headers={"Content-Type": content_type})
        response = conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError("%s %s: %d %s" % (method, path, response.status, data[:200]))

    def work(offset):
        conn = connect()
        try:
            for i in range(offset, n, threads):
                name = "j%d" % i
                job = {"apiVersion": "dispy.io/v1alpha1", "kind": "DispyJob",
                       "metadata": {"name": name}, "spec": {"cluster": cluster, "args": [i]}}
                send(conn, "POST", base, job, "application/json")
                if created_only:
                    continue
                applied = {"apiVersion": "dispy.io/v1alpha1", "kind": "DispyJob",
                           "metadata": {"name": name},
                           "status": status(i, "127.0.0.%d" % (61 + i % 2))}
                send(conn, "PATCH", "%s/%s/status?fieldManager=dispy-operator&force=true"
                     % (base, name), applied, "application/apply-patch+yaml")
        except Exception as e:  # reported below; the other threads go on
            failures.append(str(e))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failures:
        sys.exit("load_jobs: %d threads failed, first: %s" % (len(failures), failures[0]))


main()
