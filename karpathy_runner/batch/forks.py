"""A sweep's local points forked from a process that has imported torch and kdl already.

A `kdl train` process spends seconds importing torch (and torch._dynamo, which its optimizer
imports) before its first step: for a sweep of small models about as long as each point trains,
and again at each rung of a halving search. So the local pool (sweep.Processes) starts one
server, `python -m karpathy_runner.forkserver` (its own session, the points' environment), that
imports them once and forks each point from there. The point is then a `kdl train` process as
the pool's `python -m karpathy_runner train ...` was: a session of its own, stdin /dev/null, its
output in the pool's files, the descriptors the pool passes it, the same environment and folder.

The server is not the sweep: a fork of the sweep would copy its state (a study's database
connections, its locks). It ignores SIGINT (a Ctrl-C is the sweep's to pass on) and ends when
the sweep's end of its socket closes, the sweep ended or killed, leaving running points to end
as they would. Should it end first (killed), the pool cannot hear the exit codes of the points it
forked (they were the server's to hear): once such a point ends, the sweep takes its status from
its run folder (sweep.status_of_run). The next points start as fresh processes.

Linux only: the system libraries of macOS are not safe in a forked child (Python's
multiprocessing spawns there for that reason); elsewhere each point is a fresh process.

The socket carries one JSON message a packet: the pool asks {"start": ARGV, "point": N} (N its
own number for the point, never used twice: a pid can be) and {"signal": S, "point": N}; the
server says {"ready": PID} once it has imported, and {"ended": N, "code": CODE} (as Popen's
returncode: -S for a signal) once it has reaped point N. A start comes with the point's
descriptors: the write end of a pipe, then its stdout, its stderr and the others it holds. The
point writes its pid to the pipe and closes it as soon as it has its own session, SIGINT handler
and output; the server closes its copy once it has forked (or dies). So the pool reads the pid,
or an end without one if no point was forked: it never starts afresh a point that runs, whenever
the server is killed, and never signals one that still ignores SIGINT as the server does.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from ..runfolder.layout import process_running, process_start_time

SERVER = "karpathy_runner.forkserver"
POLL_S = 0.05  # how soon the server reports a point that ended
MAX_FDS = 16
PACKET = 1 << 20  # the largest message: a point's arguments
# the return code of a point whose end the pool could not hear (its server was killed first)
UNKNOWN_EXIT = 1


def available() -> bool:
    return sys.platform == "linux"


class Forks:
    """The pool's side: the server, started at once, and the points it forked."""

    def __init__(self, environment: dict[str, str]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server = subprocess.Popen(
            [sys.executable, "-m", SERVER, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.channel: socket.socket | None = ours
        self.started = 0  # the points asked for, which numbers them
        self.ended: dict[int, int] = {}  # point: exit code
        self.unheard: set[int] = set()  # points that ended after the server: UNKNOWN_EXIT
        self.alive: dict[int, tuple[int, int | None]] = {}  # point: its pid and start time
        if self._receive().get("ready") is None:  # it could not start: points start as fresh processes
            self.close()

    @property
    def serving(self) -> bool:
        return self.channel is not None

    def start(self, argv: list[str], fds: list[int]) -> Forked | None:
        """Fork a point running `kdl train ARGV` (argv less the program), its stdout and stderr
        fds[0] and fds[1], holding the others; None if none was forked (the server is gone)."""
        self.started += 1
        point = self.started
        born, told = os.pipe()
        try:
            sent = self._send({"start": argv, "point": point}, [told, *fds])
        finally:
            os.close(told)
        try:  # the point's pid, or nothing once every copy of `told` is closed: no point
            pid = int(os.read(born, 32) or 0) if sent else 0
        finally:
            os.close(born)
        if not pid:
            return None
        self.alive[point] = (pid, process_start_time(pid))
        return Forked(self, point, pid)

    def close(self) -> None:
        """Let the server end (points running go on)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.server.poll() is None:
            try:
                self.server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def collect(self, timeout: float = 0.0) -> None:
        """Read what the server said of points that ended, waiting up to `timeout` for a word."""
        while self.channel is not None:
            if not select.select([self.channel], [], [], timeout)[0]:
                return
            timeout = 0.0
            self._take(self._receive())
        # the server is gone: a point it forked ends unheard, once its pid is gone or a zombie
        time.sleep(timeout)
        for point in [p for p, process in self.alive.items() if not process_running(*process)]:
            self.ended[point] = UNKNOWN_EXIT
            self.unheard.add(point)
            del self.alive[point]

    def signal(self, point: int, signum: int) -> None:
        if self.channel is not None:  # the server signals it only if it has not reaped it
            self._send({"signal": signum, "point": point}, [])
        elif point in self.alive and process_running(*self.alive[point]):
            try:
                os.kill(self.alive[point][0], signum)
            except ProcessLookupError:
                pass

    def _take(self, message: dict[str, Any]) -> None:
        if "ended" in message:
            self.ended[message["ended"]] = message["code"]
            self.alive.pop(message["ended"], None)

    def _send(self, message: dict[str, Any], fds: list[int]) -> bool:
        if self.channel is None:
            return False
        try:
            socket.send_fds(self.channel, [json.dumps(message).encode()], fds)
            return True
        except OSError:  # the server is gone
            self._gone()
            return False

    def _receive(self) -> dict[str, Any]:
        try:
            packet = self.channel.recv(PACKET)
        except OSError:
            packet = b""
        if not packet:
            self._gone()
            return {}
        return json.loads(packet)

    def _gone(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


class Forked:
    """A point forked by the server, waited on and signalled as a subprocess.Popen is."""

    def __init__(self, forks: Forks, point: int, pid: int):
        self.forks, self.point, self.pid, self.returncode = forks, point, pid, None

    @property
    def heard(self) -> bool:
        """Is its return code the point's own? Not if it ended after the server (UNKNOWN_EXIT)."""
        return self.point not in self.forks.unheard

    def poll(self) -> int | None:
        if self.returncode is None:
            self.forks.collect()
            self.returncode = self.forks.ended.get(self.point)
        return self.returncode

    def wait(self) -> int:
        while self.poll() is None:
            self.forks.collect(timeout=POLL_S)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            self.forks.signal(self.point, signum)


# ----------------------------------------------------------------------------- the server


def serve(fd: int) -> list[str] | None:
    """The server's loop, on the socket `fd`, once it has imported what points use. It returns
    in each forked point, with the point's `kdl train` arguments, and in the server once the
    pool has closed its end (None)."""
    channel = socket.socket(fileno=fd)
    interrupt = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children: dict[int, int] = {}  # the pool's number of a point: its pid, until reaped
    channel.send(json.dumps({"ready": os.getpid()}).encode())
    while True:
        readable = select.select([channel], [], [], POLL_S)[0]
        for point, pid in list(children.items()):
            ended, status = os.waitpid(pid, os.WNOHANG)
            if ended:
                del children[point]
                _tell(channel, {"ended": point, "code": os.waitstatus_to_exitcode(status)})
        if not readable:
            continue
        try:
            packet, fds, _, _ = socket.recv_fds(channel, PACKET, MAX_FDS)
        except OSError:
            packet, fds = b"", []
        if not packet:
            return None
        request = json.loads(packet)
        if "signal" in request:
            if request["point"] in children:  # not reaped: the pid is still the point's
                os.kill(children[request["point"]], request["signal"])
            continue
        pid = os.fork()
        if pid == 0:
            channel.close()
            born, *fds = fds
            _become_point(fds, interrupt)
            os.write(born, str(os.getpid()).encode())  # (signals come once the pool has its pid)
            os.close(born)
            return request["start"]
        children[request["point"]] = pid
        for descriptor in fds:
            os.close(descriptor)


def _tell(channel: socket.socket, message: dict[str, Any]) -> None:
    try:
        channel.send(json.dumps(message).encode())
    except OSError:  # the pool is gone; the loop ends at its next read
        pass


def _become_point(fds: list[int], interrupt: Any) -> None:
    """In the forked child: what Popen(..., stdout=fds[0], stderr=fds[1], start_new_session=True,
    pass_fds=fds[2:]) gives a fresh process (its stdin is the server's, /dev/null)."""
    os.setsid()
    signal.signal(signal.SIGINT, interrupt)
    for source, target in ((fds[0], 1), (fds[1], 2)):
        os.dup2(source, target)
        os.close(source)
