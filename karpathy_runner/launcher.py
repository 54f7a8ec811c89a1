"""`kdl train CONFIG --nproc-per-node N [--nnodes M ...]`: the launcher. It runs PyTorch's own
torch.distributed.run (what `torchrun` runs) on kdl's entry point, `python -m karpathy_runner
train ...`, whose processes then train as distributed.py says. Over several machines the
launchers first meet at the machine of --node-rank 0 (`_Meeting`): each says what it waits
for, and a failed meeting or a Ctrl-C meanwhile is one line. The launcher says the errors its
workers left, each once, and exits with their code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import KdlError
from .workers import ERRORS, left_errors

# how long the launchers of several machines wait to meet (torchrun's own default), and the port
# torchrun meets at on the machine of --node-rank 0 when --master-port is left out
MEETING_TIMEOUT_S = 600
DEFAULT_PORT = 29500
# the signals that end a launcher while the machines meet, and how it says so
_STOPS = {signal.SIGINT: "interrupted", signal.SIGTERM: "stopped by SIGTERM,"}


def launch(worker_args: list[str], nproc_per_node: int, nnodes: int, node_rank: int,
           master_addr: str, master_port: int | None) -> int:
    """Run torch.distributed.run on `python -m karpathy_runner WORKER_ARGS` and return the exit
    code: 0, the failed ranks' own code (1 failed, 2 bad input), or 128 + signal. On one machine
    without a port, torchrun finds a free one."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    meeting = _Meeting(nnodes, node_rank, master_addr, master_port or DEFAULT_PORT)
    meeting.check_address()
    if nproc_per_node > 1:  # what torchrun sets for several processes a machine; without its warning
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    said = _SaidByKdl()
    torchrun_logs = [logging.getLogger(f"torch.distributed.elastic.{name}.api")
                     for name in ("multiprocessing", "agent.server")]
    for log in torchrun_logs:
        log.addFilter(said)
    # the launch's own folder, removed at its end: the errors the workers leave, and torchrun's
    # folders of each worker (else a folder of torchrun's own in the temporary folder, left there)
    scratch = meeting.scratch = tempfile.mkdtemp(prefix="kdl-launch-")
    os.environ[ERRORS] = scratch
    try:
        port = [] if master_port is None else [f"--master-port={master_port}"]
        args = parse_args([
            f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--master-addr={master_addr}", *port, f"--rdzv-conf=timeout={meeting.torch_timeout_s}",
            f"--log-dir={os.path.join(scratch, 'torchrun')}", "--module", "karpathy_runner", *worker_args,
        ])
        with meeting.watched():
            run(args)
    except SignalException as exc:  # the workers got it too, saved a checkpoint and stopped
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        return _exit_code(exc.failures)
    except torch.distributed.DistError as exc:  # the launchers never met: no worker started
        raise meeting.failed(exc) from None
    finally:
        for log in torchrun_logs:
            log.removeFilter(said)
        with contextlib.suppress(OSError):  # last: after torchrun's lines about its workers
            for line in _error_lines(left_errors(scratch)):
                print(line, file=sys.stderr, flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
        os.environ.pop(ERRORS, None)
    return 0


def _error_lines(errors: dict[int, str]) -> list[str]:
    """The workers' errors, each said once (in the order of the ranks): processes that failed
    alike (a missing file, a refused config) say one paragraph, not one each, and without ranks
    (which of them got there before torchrun stopped the others is a race). Errors that differ
    name the ranks that gave each, unless rank 0 did."""
    ranks: dict[str, list[int]] = {}
    for rank, text in sorted(errors.items()):
        ranks.setdefault(text, []).append(rank)
    alike = len(ranks) == 1
    return [f"error: {'' if alike or 0 in who else _ranks(who)}{text}" for text, who in ranks.items()]


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: "


@dataclass
class _Meeting:
    """Where the launchers meet before any worker starts (torchrun's static rendezvous): the
    launcher of --node-rank 0 listens at --master-port and waits for the others, which connect
    to it at --master-addr, for MEETING_TIMEOUT_S at most."""

    nnodes: int
    node_rank: int
    addr: str
    port: int  # (torchrun's DEFAULT_PORT where none was given)
    scratch: str | None = None  # a folder of the launch's, removed by a launcher that gives up

    @property
    def where(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def waiting(self) -> str:
        if self.node_rank == 0:
            others = "the other machine" if self.nnodes == 2 else f"the other {self.nnodes - 1} machines"
            return f"waiting at port {self.port} for {others} to join"
        return f"waiting to join machine 0 at {self.where}"

    @property
    def watchable(self) -> bool:
        """Whether a thread can tell that the launchers still meet: torchrun's SIGINT handler is
        not in place yet (it puts it there as it starts the workers, from the main thread)."""
        return (self.nnodes > 1 and threading.current_thread() is threading.main_thread()
                and "SIGINT" in os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGINT"))

    @property
    def torch_timeout_s(self) -> int:
        """torchrun's limit for the meeting. On a machine other than 0 kdl keeps the time itself
        (`_watch`), and torch's a minute later: its client gives up after trying twice (twice
        the time), each time with pages of C++ log."""
        return MEETING_TIMEOUT_S + (60 if self.node_rank and self.watchable else 0)

    def _announce(self) -> None:
        """A launcher that waits for other machines says for what."""
        if self.nnodes > 1:
            shows = " (machine 0 shows the training)" if self.node_rank else ""
            print(f"machine {self.node_rank} of {self.nnodes}: {self.waiting}, for up to "
                  f"{_span(MEETING_TIMEOUT_S)}{shows}", file=sys.stderr, flush=True)

    def check_address(self) -> None:
        """Refuse an address this machine cannot look up, at once: torch's client would retry it
        for MEETING_TIMEOUT_S, with a warning twice a second."""
        try:
            socket.getaddrinfo(self.addr, self.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise KdlError(
                f"--master-addr {self.addr}: this machine cannot look that address up "
                f"({getattr(exc, 'strerror', None) or exc}). Give the host name or IP address of the "
                "machine of --node-rank 0, as every machine reaches it") from None

    def failed(self, exc: Exception | None) -> KdlError:
        """What a launcher that met no other says: torch's reason (None: kdl's time ran out), and
        what to check."""
        reason = "" if exc is None else (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        if "EADDRINUSE" in reason or "address already in use" in reason:
            return KdlError(
                f"port {self.port} is in use on this machine ({reason}): choose a free one with --master-port"
                + (", the same on every machine" if self.nnodes > 1 else ", or leave it out (on one "
                   "machine torchrun finds a free one)"))
        within = f"within {_span(MEETING_TIMEOUT_S)}" + (f" ({reason})" if reason else "")
        if self.node_rank == 0:
            return KdlError(
                f"the other machines did not all join machine 0 at port {self.port} {within}. Start "
                f"the same command on each of them with its own --node-rank (1 to {self.nnodes - 1}), "
                f"--master-addr the address of this machine and --master-port {self.port}, and check "
                "that they can reach it there")
        others = " and on the others with their own --node-rank" if self.nnodes > 2 else ""
        return KdlError(
            f"machine {self.node_rank} could not meet the other machines at machine 0, {self.where}, "
            f"{within}. Start the same command there with --node-rank 0 (it waits for the others){others}, "
            "and check that --master-addr is that machine's address and --master-port a port on it "
            "that this machine can reach")

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """While the launchers meet, a thread keeps the time on machines other than 0 and ends
        the launcher at a Ctrl-C or a SIGTERM (exit 130 or 143), saying so: torchrun waits
        inside torch's TCPStore, where Python's signal handlers wait for it to return. The
        signals reach the thread through Python's wakeup fd (their handlers do nothing
        meanwhile: no KeyboardInterrupt where torchrun may be in Python yet). Once torchrun starts
        the workers (and puts its own handlers in place, which pass signals on to them: they stop
        with a checkpoint), the thread only waits for the launch to end."""
        if not self.watchable:  # (one machine meets at once; SIGINT left to the workers alone)
            self._announce()
            yield
            return
        before = {signum: signal.getsignal(signum) for signum in _STOPS}
        heard = [signum for signum, handler in before.items() if handler not in (signal.SIG_IGN, None)]
        for signum in heard:  # (a signal ignored stays ignored: a script's background job)
            signal.signal(signum, _meanwhile)
        read, write = os.pipe()
        os.set_blocking(write, False)
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False) if heard else None
        watcher = threading.Thread(target=self._watch, args=(read, signal.getsignal(signal.SIGINT)),
                                   daemon=True, name="kdl-meeting")
        watcher.start()
        try:
            self._announce()  # (a signal is heard from now on)
            yield
        finally:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            for signum in heard:
                if signal.getsignal(signum) is _meanwhile:  # (no worker started: torchrun's is not)
                    signal.signal(signum, before[signum])
            os.close(write)  # the watcher reads the end of the pipe and ends
            watcher.join()
            os.close(read)

    def _watch(self, read: int, meeting_handler: Any) -> None:
        deadline = time.monotonic() + MEETING_TIMEOUT_S if self.node_rank else None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            got = os.read(read, 64) if select.select([read], [], [], wait)[0] else None
            if got == b"":  # the launch is over
                return
            meeting = signal.getsignal(signal.SIGINT) is meeting_handler  # no worker yet
            if got is None:  # the time is up
                deadline = None
                if meeting:
                    self._give_up(f"error: {self.failed(None)}", 2)
            elif meeting and (stop := next((signum for signum in _STOPS if signum in got), None)):
                self._give_up(f"{_STOPS[stop]} {self.waiting}; no training process had started", 128 + stop)

    def _give_up(self, line: str, code: int) -> None:
        """End the launcher from the watcher (torchrun's wait cannot be interrupted), `line` its
        last: torch's C++ client logs its connect that a Ctrl-C interrupted, with a stack."""
        sys.stderr.flush()
        said = os.dup(2)
        with open(os.devnull, "wb") as nowhere:
            os.dup2(nowhere.fileno(), 2)
        os.write(said, f"{line}\n".encode())
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        os._exit(code)


def _meanwhile(signum: int, frame: Any) -> None:
    """SIGINT's and SIGTERM's handler while the launchers meet: the meeting's thread hears them
    (wakeup fd)."""


def _span(seconds: int) -> str:
    return f"{seconds // 60} minutes" if seconds % 60 == 0 and seconds >= 120 else f"{seconds} s"


class _SaidByKdl(logging.Filter):
    """Leaves out torchrun's error line about a worker that ended with one of kdl's own exit
    codes (1 failed, 2 bad input, 130 and 143 stopped with a checkpoint): that worker has said
    why in its own words, and torchrun's line after them ("failed (exitcode: 143) ...") would be
    the last a shell script reads. A worker killed by a signal said nothing: its line stays.
    Also torchrun's lines as it passes a stop signal on, or stops the others after a worker
    ended ("Received 2 death signal, shutting down workers", "Sending process 6213 closing
    signal SIGINT"): kdl's processes say how they stop. A process that torchrun has to kill
    after its shutdown timeout still reads "Unable to shutdown process"."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(("Received %s death signal", "Sending process %s closing signal")):
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        return not (message.startswith("failed (exitcode") and args
                    and args[0] in (1, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM))


def _exit_code(failures: dict[int, Any]) -> int:
    """The launcher's exit code from its workers' (by rank): a worker killed by a signal (the
    likely first cause: the others then fail in a collective), else the lowest rank's code. A
    SIGTERM exit is only the cause when every worker stopped for it."""
    codes = {rank: 128 - f.exitcode if f.exitcode < 0 else f.exitcode for rank, f in failures.items()}
    causes = {rank: code for rank, code in codes.items() if code != 128 + signal.SIGTERM}
    if not causes:
        return 128 + signal.SIGTERM
    return min(causes.items(), key=lambda item: (item[1] < 128, item[0]))[1]
