"""Sandboxed execution of model-written Python for code rewards (spec 7: "compiler/test cases for LeetCode").

The child runs `python -I` (isolated: no site dirs, no PYTHON* variables) with:
- a wall-clock limit; on expiry its whole process group (it leads a new session) gets SIGKILL, and so do any
  members left when it exits on its own (a forked child sleeping in the background);
- RLIMIT_AS (memory), RLIMIT_NPROC (processes/threads), RLIMIT_FSIZE (file size; stdout/stderr go to files, so
  output is bounded too), RLIMIT_CPU as a backstop, RLIMIT_CORE 0; soft = hard, so the child cannot raise them;
- a fresh temporary working directory, removed afterwards; an empty environment; stdin from /dev/null (EOF at once);
- a non-root user: the kernel never applies RLIMIT_NPROC to uid 0 (copy_process exempts INIT_USER, even inside a
  user namespace that maps root to root), so when we are root the child drops to `sandbox_uid` (nobody) after
  setting its limits, and runs a world-executable interpreter (ours may live under /root). The process count is
  per uid: concurrent sandboxes share the budget, and for a non-root caller it includes the caller's processes;
- no network. Preferred ("namespaces"): the child runs under `unshare --user --map-root-user --net --pid --fork
  --kill-child`: a new network namespace with only a down loopback, so no connection can leave it, and a new PID
  namespace whose end kills every process in it (even one that escaped the process group with setsid). Fallback ("audit-hook", when `unshare` is
  missing or fails): a PEP 578 audit hook installed before the code runs raises on socket connect/bind/sendto/
  getaddrinfo; weaker (ctypes can get around it), so the result says which one ran.
Killed members of the group are reaped by init, not by us: they may show as zombies for a moment after return.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_AUDIT_PRELUDE = """
import sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                 "socket.gethostbyname", "socket.gethostbyaddr"):
        raise PermissionError("network access is blocked in the sandbox: " + event)
sys.addaudithook(_no_network)
del _no_network
__name__ = "__main__"
exec(compile(open("main.py").read(), "main.py", "exec"))
"""


# new user, network and PID namespaces; the code runs as the PID namespace's init, so when it dies (or unshare dies:
# --kill-child) the kernel kills everything in the namespace, also processes that left our process group by setsid
_UNSHARE = ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]


class SandboxUnavailable(RuntimeError):
    """No isolation that keeps the limits binding can be set up on this machine."""


@dataclass
class SandboxResult:
    returncode: int              # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    isolation: str               # "namespaces" | "audit-hook"
    pid: int                     # the child's pid = its process group id (for checks that nothing survived)
    workdir: str                 # removed by the time the result is returned


@lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """Whether `unshare` can give an unprivileged user + network namespace here (probed once)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, *_UNSHARE, "true"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10, env={})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _choose_isolation(isolation: str | None) -> str:
    if isolation is not None:
        if isolation not in ("namespaces", "audit-hook"):
            raise ValueError(f"isolation must be 'namespaces' or 'audit-hook', got {isolation!r}")
        if isolation == "namespaces" and not namespaces_available():
            raise SandboxUnavailable("unshare cannot create user + network namespaces here")
        return isolation
    return "namespaces" if namespaces_available() else "audit-hook"


def _world_executable(path: str) -> bool:
    """Whether any user can run `path`: the file and every directory above it have the others' x bit."""
    p = Path(os.path.realpath(path))
    return all(q.exists() and q.stat().st_mode & stat.S_IXOTH for q in [p, *p.parents])


def interpreter() -> str:
    """Our interpreter when the child keeps our uid or can run it; else a system python3 that anyone can run."""
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    for candidate in (shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"),):
        if candidate and _world_executable(candidate):
            return candidate
    raise SandboxUnavailable("no python3 that an unprivileged user can execute")


def _limits(memory_mb: int, max_procs: int, max_file_mb: int, cpu_s: int, uid: int | None):
    """The preexec function: runs in the forked child before exec, so the limits cover the child and its forks.
    Limits first (root may set any), then the uid drop (after it, nothing can raise them)."""
    def apply():
        for res, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_NPROC, max_procs),
                           (resource.RLIMIT_FSIZE, max_file_mb << 20), (resource.RLIMIT_CPU, cpu_s),
                           (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (value, value))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return apply


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int = 32,
               max_file_mb: int = 8, max_output_chars: int = 1 << 16, isolation: str | None = None,
               sandbox_uid: int = 65534) -> SandboxResult:
    """Run `code` as a script in the sandbox and return its exit status and (truncated) output."""
    mode = _choose_isolation(isolation)
    uid = sandbox_uid if os.geteuid() == 0 else None
    python = interpreter()
    root = tempfile.mkdtemp(prefix="dsv3-sandbox-")
    work = os.path.join(root, "work")                    # the child's cwd; outputs live beside it, not in it
    try:
        os.mkdir(work)
        Path(work, "main.py").write_text(code)
        if uid is not None:
            for d in (root, work):
                os.chown(d, uid, uid)
        argv = [python, "-I", "-B"] + (["main.py"] if mode == "namespaces" else ["-c", _AUDIT_PRELUDE])
        if mode == "namespaces":
            argv = [shutil.which("unshare"), *_UNSHARE, "--"] + argv
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True,
                                    preexec_fn=_limits(memory_mb, max_procs, max_file_mb, int(timeout_s) + 1, uid))
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        # members of the group that outlived the leader (the group id stays reserved while any member lives)
        _kill_group(proc.pid)

        def read(name: str) -> str:
            with open(os.path.join(root, name), "rb") as f:
                return f.read(max_output_chars).decode("utf-8", "replace")
        return SandboxResult(proc.returncode, read("stdout"), read("stderr"), timed_out, mode, proc.pid, work)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def code_reward(code: str, tests: str, **limits) -> float:
    """1.0 when `code` followed by `tests` (asserts) runs to exit status 0 within the limits, else 0.0."""
    result = run_python(code + "\n\n" + tests + "\n", **limits)
    return 1.0 if result.returncode == 0 and not result.timed_out else 0.0
