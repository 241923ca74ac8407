"""Python host of one dispy computation, started by dispynode.

The node writes frames to our stdin: a 4-byte big-endian length, a kind byte, then a body.
  I  init      JSON {source, function, setup, setup_args, cleanup, reuse_workers, workers,
                     max_output, codec, env}
  J  job       8-byte run token, 4-byte worker index, then the job's call (codec-encoded);
               with reuse_workers the node writes these straight to each worker's own pipe
               (their read ends are `worker_fds`, inherited from the node)
  K  kill      8-byte run token, 4-byte signal number, 4-byte worker index (0xffffffff: none)
  C  close     JSON {cleanup}
Replies go to the node on the file descriptor that was our stdout (fd 1 is then pointed at
stderr, so stray writes from user code cannot corrupt the stream), as frames of the same
shape, each written with a single os.write of at most PIPE_BUF bytes so that the host, its
job processes and its workers can share the pipe:
  I  init done JSON {ok, error}
  R  job reply 8-byte run token, JSON {s, r, o, e, x, t0, t1, od, ed}
  F  job reply too large for one write: 8-byte run token, path of a file holding the JSON
  P  provisional result (native computations' dispy_provisional_result): 8-byte run token,
               JSON of the value
  Q  provisional result too large for one write: 8-byte run token, path of a file holding it
  S  sent file (native computations' dispy_send_file): 8-byte run token, JSON {path, name}:
               a copy of the file in the sent directory, and the name the client saves it as
  X  process gone 8-byte run token, 4-byte wait status of the process that ran that job;
               after its reply this is stale, without one it says how the job died
  W  worker gone 4-byte worker index, 4-byte wait status (a fresh worker replaces it)
  C  closed    JSON {ok, error}

The computation's source runs as module __main__ with os and sys imported, as on dispy's
node. Setup runs once here; by default each job runs in a process forked from this
post-setup state, so it sees setup's globals and its own changes are lost when it ends
(processes are forked ahead of time, so the fork is not on the job's path).
With reuse_workers, `workers` processes are forked once after setup and run jobs one after
another: much faster, and a job's changes to globals are seen by later jobs of its worker.
"""

import _json
import io
import os
import select
import struct
import sys
import time
import types

PIPE_BUF = 4096
# Linux's number: the signal module would import enum, as the json package imports re. Every
# import grows the heap each fork copies and each job process tears down, so the host imports
# only what every job needs (what each costs: docs/dispynode.md, Performance).
SIGKILL = 9


def format_exc():
    # traceback is imported only when needed: every import makes each fork slower.
    import traceback

    return traceback.format_exc()


class json:
    """JSON through the interpreter's C codec (_json), which is all the json package uses for
    the work; the package's Python layer would bring re with it (see SIGKILL)."""

    class Context:  # the parser settings _json's scanner reads, json.loads's defaults
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        memo = {}

        @staticmethod
        def parse_constant(name):  # NaN, Infinity, -Infinity
            return float(name.replace("inity", ""))

    @staticmethod
    def unsupported(value):
        raise TypeError("Object of type %s is not JSON serializable" % type(value).__name__)

    scan = _json.make_scanner(Context)
    encode = _json.make_encoder({}, unsupported.__func__, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)

    @classmethod
    def loads(cls, text):
        text = (text if isinstance(text, str) else bytes(text).decode()).strip()
        try:
            value, end = cls.scan(text, 0)
            if end == len(text):
                return value
        except (StopIteration, SystemError):
            # _json reports errors inside a value only when json.decoder is loaded.
            pass
        finally:
            cls.Context.memo.clear()
        import json as package  # bad input is rare: the package says what is wrong with it

        return package.loads(text)

    @classmethod
    def dumps(cls, value):
        return "".join(cls.encode(value, 0))


HEADER = struct.Struct(">IB")
RUN = struct.Struct(">Q")
RUN_WORKER = struct.Struct(">QI")
RUN_SIGNAL_WORKER = struct.Struct(">QiI")
WORKER_STATUS = struct.Struct(">Ii")
NO_WORKER = 0xFFFFFFFF
RUN_STATUS = struct.Struct(">Qi")
# A job's reply, JSON written by hand (see Host.job_runner): status, result, stdout, stderr,
# exception, start and end times, and how much of stdout and stderr was cut.
REPLY = '{"s": "%s", "r": %s, "o": %s, "e": %s, "x": %s, "t0": %r, "t1": %r, "od": %d, "ed": %d}'
# Fork per job: when fewer spares than cpus are left, SPARE_BATCH + 1 are forked in a row. Every
# page the host writes between forks is a page copied, so its work between batches is copied
# once per batch instead of once per job; the price is a longer tail of latency when jobs come
# one at a time (one in SPARE_BATCH + 1 waits for the batch).
SPARE_BATCH = 6


class JsonCodec:
    """Arguments and results as JSON: the native protocol's codec. A call is [args, kwargs].
    Jobs may call dispy_provisional_result(value) and dispy_send_file(path), which go to the
    client through the node (frames P, Q and S), on the connection the client already has."""

    rehearsal_call = b"[[0], {}]"  # a call with one argument (see Host.rehearse)

    def __init__(self, host):
        self.host = host
        host.globals.update(dispy_provisional_result=self.provisional_result, dispy_send_file=self.send_file)

    def provisional_result(self, result, relay=False, timeout=10):
        """Sends a provisional result of the running job to its client; 0 when the node has
        it, -1 when it cannot be sent (the reason goes to the job's stderr)."""
        run = self.host.current[0]
        if not run:
            sys.stderr.write("dispy_provisional_result: only a running job has a result\n")
            return -1
        try:
            body = json.dumps(result).encode()
        except (TypeError, ValueError) as e:
            sys.stderr.write("dispy_provisional_result: the value cannot be sent as JSON: %s\n" % e)
            return -1
        self.host.send_job_frame(ord("P"), ord("Q"), run, body)
        return 0

    def send_file(self, path, relay=False, timeout=10):
        """Sends a file to the job's client, which saves it under its path relative to the
        job's working directory (or its base name when it is elsewhere). The contents are
        taken now. 0 when the node has them, -1 when the file cannot be sent (the reason goes
        to the job's stderr): missing, not a regular file, or over what a job may send."""
        host, current = self.host, self.host.current
        run = current[0]
        if not run:
            sys.stderr.write("dispy_send_file: only a running job can send files\n")
            return -1
        try:
            full = os.path.abspath(path)
            cwd = os.getcwd()
            name = full[len(cwd) + 1 :] if full.startswith(cwd + os.sep) else os.path.basename(full)
            if not name or len(name) > 1024:
                raise ValueError("the name %r cannot be sent (empty or over 1024 characters)" % name)
            if not os.path.isfile(full):  # a FIFO would block the job
                raise ValueError("%s is not a regular file" % full)
            with open(full, "rb") as f:
                left = host.cfg.get("max_sent_file", 1 << 20) - current[1]
                data = f.read(left + 1)
            if len(data) > left:
                raise ValueError("%s is over the %d bytes a job may send in files (--max_file_size and --max_frame set it)" % (full, host.cfg.get("max_sent_file")))
            os.makedirs(host.sent_dir, exist_ok=True)
            current[2] += 1
            spool = os.path.join(host.sent_dir, "%d-%d" % (run, current[2]))
            with open(spool, "wb") as f:
                f.write(data)
        except (OSError, ValueError) as e:
            sys.stderr.write("dispy_send_file: %s\n" % e)
            return -1
        frame = RUN.pack(run) + json.dumps({"path": spool, "name": name}).encode()
        if HEADER.size + len(frame) > PIPE_BUF:  # jobs share the pipe: one write each
            os.unlink(spool)
            sys.stderr.write("dispy_send_file: the path of %s is too long to send\n" % full)
            return -1
        current[1] += len(data)
        host.send(ord("S"), frame)
        return 0

    def decode_setup_args(self, value):
        return value or []

    @staticmethod
    def caller(func):
        """Returns call(body): func run on the call's arguments, its result as JSON text. One
        function, with what it uses bound beforehand (see Host.job_runner)."""
        scan, encode, loads, memo = json.scan, json.encode, json.loads, json.Context.memo

        def call(body):
            text = body.decode()
            try:
                (args, kwargs), end = scan(text, 0)
            except (StopIteration, SystemError, ValueError):
                end = -1
            if memo:  # the keys of the objects read (an empty memo is left untouched)
                memo.clear()
            if end != len(text):
                args, kwargs = loads(text)  # says what is wrong with it
            value = func(*args, **kwargs)
            try:
                return "".join(encode(value, 0))
            except (TypeError, ValueError) as e:
                raise TypeError("the result of type %s cannot be sent as JSON: %s" % (type(value).__name__, e))

        return call


# The standard modules dispynode.py 4.15 imports at its top, which its jobs see as globals
# (multiprocessing left out: its fork-unsafe machinery has no place in a forked job).
DISPYNODE_MODULES = (
    "time", "stat", "socket", "threading", "subprocess", "traceback", "marshal", "tempfile",
    "shutil", "glob", "pickle", "io", "signal", "platform", "copy", "struct", "hashlib", "re",
    "errno",
)


def dispynode_logger():
    """dispynode.py's `dispynode_logger`, which its jobs may log with: here its lines go to the
    host's stderr, which the node logs."""
    import logging

    logger = logging.getLogger("dispynode")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


class PickleCodec:
    """dispy's own clients (pickle, as dispy 4.15's node). The node sends setup arguments as
    the hex of a pickled tuple, and each call as a pickle of {a: pickled args, k: pickled
    kwargs, c: source of the job's dispy_job_depends, u: uid, h: hash}; results go back as
    the hex of a pickle. The job's code may call dispy_provisional_result and dispy_send_file,
    which talk to the client directly, as on dispy's node."""

    def __init__(self, host):
        import pickle

        self.pickle = pickle
        self.globals = host.globals
        self.job = None
        self.rehearsal_call = pickle.dumps({"a": pickle.dumps(()), "k": pickle.dumps({})})
        self.globals.update(dispy_provisional_result=self.provisional_result, dispy_send_file=self.send_file)
        # dispynode.py runs jobs in its own module's namespace, so dispy programs use the
        # modules it imported without importing them (dispy's examples call time.sleep so).
        # Only for dispy's clients: each module is heap that every forked job copies.
        for name in DISPYNODE_MODULES:
            self.globals.setdefault(name, __import__(name))
        self.globals.setdefault("dispynode_logger", dispynode_logger())

    def decode_setup_args(self, value):
        return self.pickle.loads(bytes.fromhex(value)) if value else ()

    def decode_call(self, body):
        call = self.pickle.loads(body)
        self.job = call
        if call.get("c"):
            exec(call["c"], self.globals)
        return self.pickle.loads(call["a"]), self.pickle.loads(call["k"])

    def encode_result(self, value):
        return self.pickle.dumps(value, 4).hex()

    def caller(self, func):
        decode, encode = self.decode_call, self.encode_result

        def call(body):
            args, kwargs = decode(body)
            return encode(func(*args, **kwargs))

        return call

    # dispy's own records (dispy._JobReply, dispy._XferFile) written by hand: the node has no
    # dispy package, and the client only needs the class path and the attributes.
    def record(self, cls, state):
        body = self.pickle.dumps(state, 2)
        return b"\x80\x02cdispy\n" + cls.encode() + b"\n)\x81" + body[2:-1] + b"b."

    def job_reply(self, status, result):
        g, job = self.globals, self.job or {}
        now = time.time()
        return self.record("_JobReply", {
            "uid": job.get("u"), "hash": job.get("h"), "ip_addr": g.get("dispy_node_ip_addr"),
            "status": status, "result": self.pickle.dumps(result, 4), "stdout": None,
            "stderr": None, "exception": None, "start_time": job.get("t0", now), "end_time": now,
        })

    def connect(self, timeout):
        import socket

        host, port = self.globals["_dispy_client_reply_addr"]
        sock = socket.create_connection((host, port), timeout=timeout)
        certfile = self.globals.get("_dispy_certfile")
        if certfile:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_verify_locations(certfile)
            sock = ctx.wrap_socket(sock)
        return sock

    @staticmethod
    def send_msg(sock, msg):
        sock.sendall(struct.pack(">L", len(msg)) + msg)

    @staticmethod
    def recv_msg(sock):
        def recvall(n):
            data = b""
            while len(data) < n:
                more = sock.recv(n - len(data))
                if not more:
                    raise EOFError("connection closed")
                data += more
            return data

        (n,) = struct.unpack(">L", recvall(4))
        return recvall(n)

    def provisional_result(self, result, relay=False, timeout=10):
        """Sends a provisional result of the running job to the client; 0 when delivered."""
        try:
            with self.connect(timeout) as sock:
                self.send_msg(sock, b"JOB_REPLY:" + self.job_reply(7, result))
                return 0 if self.recv_msg(sock) == b"ACK" else -1
        except Exception:
            return -1

    def send_file(self, path, relay=False, timeout=10):
        """Sends a file to the client, which saves it under its working directory; 0 when done."""
        try:
            path = os.path.abspath(path)
            cwd = os.getcwd()
            dest = os.path.dirname(path[len(cwd):].lstrip(os.sep)) if path.startswith(cwd) else "."
            st = os.stat(path)
            xf = self.record("_XferFile", {"name": path, "dest_path": dest, "compute_id": self.globals.get("_dispy_compute_id"), "stat_buf": st, "sep": os.sep})
            with self.connect(timeout) as sock, open(path, "rb") as f:
                self.send_msg(sock, b"FILEXFER:" + xf)
                self.send_msg(sock, self.job_reply(6, None))
                recvd, sent = self.pickle.loads(self.recv_msg(sock)), 0
                while sent == recvd:
                    data = f.read(1024000)
                    if not data:
                        break
                    sock.sendall(data)
                    sent += len(data)
                    recvd = self.pickle.loads(self.recv_msg(sock))
                return 0 if recvd == st.st_size else -1
        except Exception:
            return -1


CODECS = {"json": JsonCodec, "pickle": PickleCodec}


class Host:
    def __init__(self):
        # Our stdin and stdout belong to the node; user code gets /dev/null and stderr instead,
        # set here once so that forked processes have nothing to rearrange (every page a fresh
        # fork touches costs a copy).
        self.ctl_fd = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        self.reply_fd = os.dup(1)
        os.dup2(2, 1)
        self.host_pid = os.getpid()
        self.pidfds = {}  # pidfd -> pid of every process we forked
        self.inbuf = bytearray()
        self.spill_dir = os.path.join(os.getcwd(), ".dispy-replies")
        self.sent_dir = os.path.join(os.getcwd(), ".dispy-sent")
        # The job this process runs: its run token, and the bytes and files it has sent.
        self.current = [0, 0, 0]
        self.spares = []  # fork per job: [(pid, job write fd)] ready for one job each
        self.running = {}  # fork per job: pid -> run token
        self.run_pid = {}  # fork per job: run token -> pid
        self.workers = []  # reuse: index -> pid
        self.job_fds = set()  # write ends of the spares' pipes
        self.spares_low = self.spares_high = 0  # fork per job: the batch refill's bounds
        self.spare_output = (None, None)  # fork per job: every spare's stdout and stderr
        self.worker_fds = []  # reuse: index -> read end of the worker's pipe from the node
        self.run_job = None  # see job_runner
        self.life = None  # fork per job: see spare_life
        self.cfg = None

    # --- output -------------------------------------------------------------------------
    def send(self, kind, body):
        frame = HEADER.pack(len(body) + 1, kind) + body
        view = memoryview(frame)
        while view:
            n = os.write(self.reply_fd, view)
            view = view[n:]

    def send_json(self, kind, obj):
        self.send(kind, json.dumps(obj).encode())

    def send_job_frame(self, kind, spilled_kind, run, body):
        """Sends a frame about a job: in one write when the pipe keeps it whole (jobs share the
        pipe), else through a file, as `spilled_kind`."""
        if HEADER.size + RUN.size + len(body) <= PIPE_BUF:
            self.send(kind, RUN.pack(run) + body)
        else:
            self.spill(run, body, spilled_kind)

    def spill(self, run, body, kind=ord("F")):
        """Sends a job's reply (or provisional result) too large for one atomic write through
        a file."""
        os.makedirs(self.spill_dir, exist_ok=True)
        # Unique for as long as the node may not have read it: run token and frame count.
        self.current[2] += 1
        path = os.path.join(self.spill_dir, "%d-%d.json" % (run, self.current[2]))
        with open(path, "wb") as f:
            f.write(body)
        self.send(kind, RUN.pack(run) + path.encode())

    # --- input --------------------------------------------------------------------------
    def frames(self, fd):
        """Reads what is available on fd; yields whole frames (kind, body). EOF -> None."""
        data = os.read(fd, 1 << 16)
        if not data:
            yield None
            return
        self.inbuf += data
        while len(self.inbuf) >= 4:
            (length,) = struct.unpack_from(">I", self.inbuf)
            if len(self.inbuf) < 4 + length:
                break
            kind = self.inbuf[4]
            body = bytes(self.inbuf[5 : 4 + length])
            del self.inbuf[: 4 + length]
            yield kind, body

    def read_init(self):
        while True:
            for frame in self.frames(self.ctl_fd):
                if frame is None:
                    sys.exit(0)
                kind, body = frame
                if kind == ord("I"):
                    return json.loads(body)

    # --- the computation ----------------------------------------------------------------
    def init(self, cfg):
        self.cfg = cfg
        self.max_output = cfg.get("max_output", 1 << 20)
        # The node runs us with -S (no site: forks are several times cheaper without it) and
        # passes the interpreter's normal sys.path; the computation's directory comes first.
        sys.path[:] = [os.getcwd()] + list(cfg.get("sys_path") or sys.path)
        main = types.ModuleType("__main__")
        main.__dict__.update(os=os, sys=sys, __builtins__=__builtins__)
        main.__dict__.update(cfg.get("env") or {})
        sys.modules["__main__"] = main
        self.globals = main.__dict__
        self.codec = CODECS[cfg.get("codec", "json")](self)
        self.setup_args = self.codec.decode_setup_args(cfg.get("setup_args"))
        try:
            code = compile(cfg["source"], "<computation>", "exec")
        except SyntaxError as e:
            return "the Python source does not compile: %s (line %s)" % (e.msg, e.lineno)
        try:
            exec(code, self.globals)
        except BaseException:
            return "running the computation's source failed:\n" + format_exc()
        func = self.globals.get(cfg["function"])
        if not callable(func):
            return "the source defines no function %r" % cfg["function"]
        setup = cfg.get("setup")
        self.run_job = self.job_runner(func, self.reply_fd)
        if setup:
            fn = self.globals.get(setup)
            if not callable(fn):
                return "the source defines no setup function %r" % setup
            try:
                ret = fn(*self.setup_args)
            except BaseException:
                return "setup %s() raised:\n%s" % (setup, format_exc())
            # dispy: 0 forks jobs from the setup state; 1 and 2 are other ways to do the same here.
            if ret not in (None, 0, 1, 2):
                return "setup %s() returned %r; it must return 0 (or 1, 2) to succeed" % (setup, ret)
        return None

    def cleanup(self):
        name = self.cfg.get("cleanup") if self.cfg else None
        if not name:
            return None
        fn = self.globals.get(name)
        if not callable(fn):
            return "the source defines no cleanup function %r" % name
        try:
            fn(*self.setup_args)
        except BaseException:
            return "cleanup %s() raised:\n%s" % (name, format_exc())
        return None

    def job_runner(self, func, reply_fd):
        """Returns run(run, body, out, err), which runs one job of `func` with its stdout and
        stderr captured (a spare brings empty buffers of its own, made before the fork:
        cheaper than making them after) and replies on `reply_fd`. It is one function, with
        what it uses bound beforehand: in a fresh fork every object the job's path touches is
        a page copied, so the path must touch no method lookup, reply dict or encoder of its
        own."""
        call, clock, quote = self.codec.caller(func), time.time, _json.encode_basestring_ascii
        limit, spill, write, current = self.max_output, self.spill, os.write, self.current
        reply_max, kind = PIPE_BUF - HEADER.size - RUN.size, ord("R")

        def run(run, body, out, err):
            t0 = clock()
            current[0], current[1], current[2] = run, 0, 0
            # Left in place after the job: a spare exits, a worker's next job brings its own.
            sys.stdout, sys.stderr = out, err
            try:
                status, result, exc = "Finished", quote(call(body)), "null"
            except BaseException:
                status, result, exc = "Terminated", "null", quote(format_exc())
            t1 = clock()
            o, e = out.getvalue(), err.getvalue()
            reply = (REPLY % (status, result, quote(o[:limit]), quote(e[:limit]), exc, t0, t1, max(0, len(o) - limit), max(0, len(e) - limit))).encode()
            if len(reply) <= reply_max:  # send()'s frame, in the one write the pipe keeps whole
                write(reply_fd, HEADER.pack(len(reply) + 1 + RUN.size, kind) + RUN.pack(run) + reply)
            else:
                spill(run, reply)

        return run

    def rehearse(self, times):
        """Fork per job: runs the job path here, without the user's function and with replies
        to /dev/null, before the spares are forked. A fresh process that runs code for the
        first time writes to it (the interpreter's warm-up counters and specializations, its
        method cache, the dynamic linker's lazy bindings), and in a fork every page written
        is a page copied: rehearsed here, the job processes inherit it done."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        run = self.job_runner(lambda *args, **kwargs: None, devnull)
        try:
            for _ in range(times):
                run(0, self.codec.rehearsal_call, *self.spare_output)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            os.close(devnull)
            if hasattr(self.codec, "job"):  # dispy's codec remembers the call it decoded
                self.codec.job = None

    # --- processes ----------------------------------------------------------------------
    # Every job runs in a process forked from this post-setup state, fed through its own pipe.
    # Fork per job (the default): a few spare processes are forked ahead of time, each runs
    # one job and exits, and a new spare is forked as soon as one is used, so the fork is not
    # on the job's path. Reuse: `workers` processes run job after job.

    def fork_worker(self, job_r):
        """Reuse: forks a worker that runs job after job from `job_r`; returns its pid."""
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                self.inbuf = bytearray()
                self.job_loop(job_r)
            except BaseException:
                sys.__stderr__.write(format_exc())
                code = 70
            os._exit(code)
        self.pidfds[os.pidfd_open(pid)] = pid
        return pid

    def start_worker(self, index):
        """Reuse: a worker reading the pipe the node opened for it."""
        pid = self.fork_worker(self.worker_fds[index])
        self.own_group(pid)
        return pid

    def job_loop(self, fd):
        """Reuse: a worker's life, job after job from its pipe."""
        while True:
            # Other processes hold copies of our pipe's write end, so the host's death does not
            # show as EOF: an idle worker looks for it.
            if not select.select([fd], [], [], 5.0)[0]:
                if os.getppid() != self.host_pid:
                    return
                continue
            for frame in self.frames(fd):
                if frame is None:
                    return
                kind, body = frame
                if kind == ord("J"):
                    run, _ = RUN_WORKER.unpack_from(body)
                    self.run_job(run, body[RUN_WORKER.size :], io.StringIO(), io.StringIO())

    def spare_life(self):
        """Fork per job: returns life(job_r), a spare's life: one job from its own pipe (the host
        writes it whole), then exit. It stays in the host's process group until then, so the
        node can kill the group. Like the job runner it is one function with what it uses
        bound: in a fresh fork every object touched is a page copied."""
        run_job, (out, err), job_fds = self.run_job, self.spare_output, self.job_fds
        read, close, header, run_worker = os.read, os.close, HEADER.unpack_from, RUN_WORKER.unpack_from
        head, start = HEADER.size, HEADER.size + RUN_WORKER.size

        def life(job_r):
            code = 0
            try:
                # The spares' pipes must have their only write ends in the host, so that every
                # spare sees EOF and exits when the host dies, however it dies.
                for fd in job_fds:
                    close(fd)
                data, end = b"", head
                while len(data) < end:
                    more = read(job_r, 1 << 16 if data else PIPE_BUF)
                    if not more:
                        break  # the host is gone
                    data += more
                    if len(data) >= head:
                        end = 4 + header(data)[0]
                else:
                    run_job(run_worker(data, head)[0], data[start:end], out, err)
            except BaseException:
                sys.__stderr__.write(format_exc())
                code = 70
            os._exit(code)

        return life

    def add_spares(self, count):
        """Fork per job: `count` processes, each waiting on a new pipe for its one job. They
        are forked in a row, the pipes made before and the bookkeeping done after: every page
        the host writes between two forks is a page copied."""
        pipes = [os.pipe() for _ in range(count)]
        self.job_fds.update(job_w for _, job_w in pipes)
        pids, life, fork = [], self.life, os.fork
        try:
            for job_r, _ in pipes:
                pid = fork()
                if pid == 0:
                    life(job_r)
                pids.append(pid)
        finally:
            for i, (job_r, job_w) in enumerate(pipes):
                os.close(job_r)
                if i < len(pids):
                    self.pidfds[os.pidfd_open(pids[i])] = pids[i]
                    self.spares.append((pids[i], job_w))
                else:  # its fork failed
                    self.forget_fd(job_w)

    def forget_fd(self, fd):
        self.job_fds.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass

    def reap(self, pidfd):
        """A process we forked has exited (its pidfd became readable)."""
        pid = self.pidfds.pop(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        run = self.running.pop(pid, None)
        if run is not None:
            self.run_pid.pop(run, None)
            # After a reply this is stale and the node ignores it; without one it is the news.
            self.send(ord("X"), RUN_STATUS.pack(run, status))
            return
        for spare in self.spares:
            if spare[0] == pid:
                self.spares.remove(spare)
                self.forget_fd(spare[1])
                if not self.closing:
                    self.add_spares(1)
                return
        for index, wpid in enumerate(self.workers):
            if wpid == pid:
                self.send(ord("W"), WORKER_STATUS.pack(index, status))
                if not self.closing:
                    self.workers[index] = self.start_worker(index)
                return

    def kill(self, run, sig, worker):
        pid = self.workers[worker] if worker < len(self.workers) else self.run_pid.get(run)
        if pid is not None:
            self.signal_group(pid, sig)

    @staticmethod
    def own_group(pid):
        # A job's process leads its own group, so terminating it reaches what it started.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass

    @staticmethod
    def signal_group(pid, sig):
        """Signals the process and, when it leads one, its group."""
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, sig)
            except ProcessLookupError:
                pass

    def dispatch(self, kind, body):
        if kind == ord("J"):
            # Fork per job: hand the job to a spare, fork the next spare.
            run, _ = RUN_WORKER.unpack_from(body)
            if not self.spares:
                self.add_spares(1)
            pid, job_w = self.spares.pop(0)
            self.own_group(pid)
            self.running[pid] = run
            self.run_pid[run] = pid
            os.write(job_w, HEADER.pack(len(body) + 1, kind) + body)
            self.forget_fd(job_w)
            if len(self.spares) < self.spares_low:
                # Spares are forked in batches: every page the host writes after a fork is a
                # page copied, so the fewer forks between its other work, the fewer copies.
                self.add_spares(self.spares_high - len(self.spares))
        elif kind == ord("K"):
            self.kill(*RUN_SIGNAL_WORKER.unpack_from(body))
        elif kind == ord("C"):
            self.close(json.loads(body or b"{}").get("cleanup", True))

    def close(self, run_cleanup):
        self.closing = True
        pids = list(self.running) + [p for p, _ in self.spares] + list(self.workers)
        for fd in list(self.job_fds):
            self.forget_fd(fd)
        for pid in pids:
            self.signal_group(pid, SIGKILL)
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        error = self.cleanup() if run_cleanup else None
        self.send_json(ord("C"), {"ok": error is None, "error": error})
        sys.exit(0)

    def serve(self):
        self.closing = False
        cfg = self.read_init()
        error = self.init(cfg)
        self.send_json(ord("I"), {"ok": error is None, "error": error})
        if error:
            sys.exit(0)
        if cfg.get("bind_now_set"):
            # The node set LD_BIND_NOW so that every library loaded so far (setup's imports
            # too) was bound before the forks; jobs and what they start should not inherit it.
            os.environ.pop("LD_BIND_NOW", None)
        count = max(1, int(cfg.get("workers", 1)))
        if cfg.get("reuse_workers"):
            self.worker_fds = list(cfg["worker_fds"])
            self.workers = [self.start_worker(i) for i in range(len(self.worker_fds))]
        else:
            self.spares_low, self.spares_high = count, count + SPARE_BATCH
            self.spare_output = io.StringIO(), io.StringIO()
            self.life = self.spare_life()
            self.rehearse(50)
            self.add_spares(self.spares_high)
        while True:
            ready, _, _ = select.select([self.ctl_fd] + list(self.pidfds), [], [])
            for fd in ready:
                if fd != self.ctl_fd:
                    self.reap(fd)
            if self.ctl_fd in ready:
                for frame in self.frames(self.ctl_fd):
                    if frame is None:
                        # The node is gone: nothing may outlive it.
                        self.close(False)
                    self.dispatch(*frame)


if __name__ == "__main__":
    Host().serve()
