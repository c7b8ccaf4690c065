"""Sandboxed execution of model-written Python for code rewards (spec 7: "compiler/test cases for LeetCode").

The child runs `python -I` (isolated: no site dirs, no PYTHON* variables) with:
- a wall-clock limit; on expiry its whole process group (it leads a new session) gets SIGKILL, and so do any
  members left when it exits on its own (a forked child sleeping in the background);
- RLIMIT_AS (memory), RLIMIT_NPROC (processes/threads), RLIMIT_FSIZE (file size; stdout/stderr go to files, so
  output is bounded too), RLIMIT_CPU as a backstop, RLIMIT_CORE 0, soft = hard. A bootstrap (`_BOOTSTRAP`) sets
  them in the child before the code is compiled: no `preexec_fn`, which Python documents as unsafe in a process
  with threads (the GRPO loop has torch's and the Engine's). Lowering needs no privilege and, without
  CAP_SYS_RESOURCE in the initial namespace, the code cannot raise them back;
- a non-root user: the kernel never applies RLIMIT_NPROC to uid 0 (copy_process exempts INIT_USER, even inside a
  user namespace that maps root to root), so when we are root the child is started as `sandbox_uid` (nobody; done
  by Popen's user/group in C) and runs a world-executable interpreter (ours may live under /root). The process
  count is per uid: concurrent sandboxes share the budget, and for a non-root caller it includes the caller's
  processes (`self_check` turns a sandbox that cannot start into an error, not into zero rewards);
- memory: RLIMIT_AS is per process, so the bound for one run, and (NPROC being per uid) for all concurrent runs, is
  max_procs x memory_mb: 8 x 512 MiB = 4 GiB by default, kept small because the machine is shared;
- when root, the child's interpreter is the system python3 (ours may not be world-readable), so code importing
  third-party packages can behave differently from a non-root run;
- a fresh temporary working directory, removed afterwards; an empty environment; stdin from /dev/null (EOF at once)
  or, for stdin/stdout tasks, from a file holding the given text (outside the working directory);
- no network and no view of the user's files. Preferred ("namespaces"): the child runs under `unshare --user
  --map-root-user --net --pid --mount --fork --kill-child`: a new network namespace with only a down loopback, so
  no connection can leave it; a new PID namespace whose end kills every process in it (even one that escaped the
  process group with setsid); a new mount namespace whose root (`_JAIL`) holds only the system and interpreter
  directories read-only, a few device nodes, its own /proc, and size-limited tmpfs for the cwd and /tmp: the home
  directory, the repository, the host's /tmp and /dev/shm and other processes' command lines are not there, and
  nothing written survives the run. All capabilities are dropped before the code runs, so it cannot undo a mount.
  Fallback ("audit-hook", when that cannot run as the sandbox user): a PEP 578 audit hook, installed before the
  code runs, raises on socket connect/bind/sendto/getaddrinfo, on starting other programs (os.system, exec, spawn,
  subprocess), on loading native code with ctypes, on writing, renaming or removing files outside the working
  directory and on reading or listing paths outside it and the interpreter's directories; weaker (an audit hook is
  no security boundary, and the working directory is on the host's disk), so the result says which one ran.
Killed members of the group are reaped by init, not by us: they may show as zombies for a moment after return.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Namespaces mode, run first (as the user namespace's root, before the limits): a private root on a small tmpfs that
# holds read-only binds of the system and interpreter directories (`ro`, the same paths as outside), a few device
# nodes, a fresh /proc for the new PID namespace (when the kernel lets it be mounted), and two size-limited tmpfs,
# /sandbox (the cwd, main.py copied in) and /tmp; pivot_root, then the old root is detached, so no path leads to
# the user's files (home, the repository, the host's /tmp) or to other processes' /proc. Then every capability is
# dropped (bounding set included, no_new_privs): the code cannot undo a mount or read past file permissions.
_JAIL = r"""
import ctypes, json, os, sys
_cfg = json.loads(sys.argv[6])
_PIVOT, _CAPSET = {"x86_64": (155, 126), "aarch64": (41, 91)}[os.uname().machine]      # syscall numbers
_libc = ctypes.CDLL(None, use_errno=True)
def _sys(rc, what):
    if rc != 0:
        _e = ctypes.get_errno()
        raise OSError(_e, "sandbox setup: " + what + ": " + os.strerror(_e))
def _mount(src, dst, fstype, flags, data=None):
    _sys(_libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     data and data.encode()), "mount " + dst)
_BIND, _REC, _RDONLY, _NOSUID, _NODEV, _REMOUNT = 4096, 16384, 1, 2, 4, 32
_new = _cfg["jail"]
_code = open("main.py", "rb").read()
_mount("tmpfs", _new, "tmpfs", _NOSUID | _NODEV, "size=1m,mode=755")
for _p in _cfg["ro"]:
    _dst = _new + _p
    if os.path.islink(_p) and os.path.dirname(_p) == "/":        # /bin -> usr/bin on a merged-/usr system
        os.symlink(os.readlink(_p), _dst)
        continue
    if not os.path.exists(_dst):
        os.makedirs(_dst) if os.path.isdir(_p) else (os.makedirs(os.path.dirname(_dst), exist_ok=True),
                                                      open(_dst, "w").close())
    _mount(_p, _dst, None, _BIND | _REC)
    _mount(None, _dst, None, _BIND | _REMOUNT | _RDONLY | _NOSUID | _NODEV)
for _p in ("/sandbox", "/tmp"):
    os.mkdir(_new + _p)
    _mount("tmpfs", _new + _p, "tmpfs", _NOSUID | _NODEV, "size=%dm,mode=1777" % _cfg["scratch_mb"])
open(_new + "/sandbox/main.py", "wb").write(_code)
os.mkdir(_new + "/dev")
for _d in ("null", "zero", "full", "random", "urandom"):
    open(_new + "/dev/" + _d, "w").close()
    _mount("/dev/" + _d, _new + "/dev/" + _d, None, _BIND)
os.mkdir(_new + "/proc")
try:
    _mount("proc", _new + "/proc", "proc", _NOSUID | _NODEV | 8)
except OSError:                       # a container may forbid it: then there is no /proc at all
    pass
os.mkdir(_new + "/.old")
_sys(_libc.syscall(_PIVOT, _new.encode(), (_new + "/.old").encode()), "pivot_root")      # SYS_pivot_root (x86_64)
os.chdir("/")
_sys(_libc.umount2(b"/.old", 2), "umount /.old")                                       # MNT_DETACH
os.rmdir("/.old")
_mount(None, "/", None, _REMOUNT | _RDONLY | _NOSUID | _NODEV)
os.chdir("/sandbox")
_sys(_libc.prctl(38, 1, 0, 0, 0), "no_new_privs")                                      # PR_SET_NO_NEW_PRIVS
for _c in range(64):
    _libc.prctl(24, _c, 0, 0, 0)                                                       # PR_CAPBSET_DROP
_libc.prctl(47, 4, 0, 0, 0)                                                            # PR_CAP_AMBIENT_CLEAR_ALL
_hdr, _data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()            # capset v3, all zero
_sys(_libc.syscall(_CAPSET, _hdr, _data), "capset")                                        # SYS_capset (x86_64)
"""

# argv: as_bytes nproc fsize_bytes cpu_s audit(0/1) json({ro: readable roots} + _JAIL's keys in namespaces mode).
# The code runs in fresh globals, as __main__.
_BOOTSTRAP = """
import os, resource, sys
_as, _nproc, _fsize, _cpu, _audit = map(int, sys.argv[1:6])
for _r, _v in ((resource.RLIMIT_AS, _as), (resource.RLIMIT_NPROC, _nproc), (resource.RLIMIT_FSIZE, _fsize),
               (resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_r, (_v, _v))
_BLOCKED = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
            "socket.gethostbyname", "socket.gethostbyaddr", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym")
def _under(path, roots):
    if isinstance(path, int):        # an open descriptor: what it names was checked when it was opened
        return True
    _p = os.path.realpath(os.fsdecode(path))
    return any(_p == _r or _p.startswith(_r.rstrip("/") + "/") for _r in roots)
_WRITES = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
           "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
           "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError("blocked in the sandbox: " + event)
    if event == "open" and args[0] is not None:
        writes = bool(set(args[1] or "") & set("wax+")) or bool((args[2] or 0) & _WRITE_FLAGS)
        if not _under(args[0], _HOME if writes else _READABLE):
            raise PermissionError("blocked in the sandbox: " + ("writing " if writes else "reading ") + str(args[0]))
    elif event in ("os.listdir", "os.scandir") and args[0] is not None and not _under(args[0], _READABLE):
        raise PermissionError("blocked in the sandbox: listing " + str(args[0]))
    elif event in _WRITES and not all(_under(args[i], _HOME) for i in _WRITES[event]):
        raise PermissionError("blocked in the sandbox: " + event + " outside the working directory")
if _audit:
    import json, os
    _HOME = [os.getcwd()]
    _READABLE = _HOME + json.loads(sys.argv[6])["ro"] + ["/dev/null", "/dev/urandom", "/proc/self"]
    sys.addaudithook(_hook)
sys.argv = ["main.py"]
_code = compile(open("main.py").read(), "main.py", "exec")
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"""

# new user, network and PID namespaces; the code runs as the PID namespace's init, so when it dies (or unshare dies:
# --kill-child) the kernel kills everything in the namespace, also processes that left our process group by setsid
_UNSHARE = ["--user", "--map-root-user", "--net", "--pid", "--mount", "--fork", "--kill-child"]


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


def _user(sandbox_uid: int) -> dict:
    """Popen arguments that start the child as the sandbox user when we are root (nothing otherwise)."""
    return dict(user=sandbox_uid, group=sandbox_uid, extra_groups=[]) if os.geteuid() == 0 else {}


@lru_cache(maxsize=4)
def namespaces_available(sandbox_uid: int = 65534) -> bool:
    """Whether `unshare` gives user + net + PID + mount namespaces to the user the child really runs as (an
    unprivileged one when we are root; some hosts allow root but not unprivileged users) and the private root
    (`_JAIL`) can be set up in them: a jailed `print` is run. Probed once per uid."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, *_UNSHARE, "true"], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=10, env={}, cwd="/", **_user(sandbox_uid))
        if probe.returncode != 0:
            return False
        r = _run("print('jail ok')", "namespaces", timeout_s=10.0, memory_mb=512, max_procs=8, max_file_mb=8,
                 max_output_chars=1 << 10, sandbox_uid=sandbox_uid, stdin=None)
    except (OSError, subprocess.SubprocessError, SandboxUnavailable):
        return False
    return r.returncode == 0 and r.stdout == "jail ok\n"


def _choose_isolation(isolation: str | None, sandbox_uid: int) -> str:
    if isolation is None:
        return "namespaces" if namespaces_available(sandbox_uid) else "audit-hook"
    if isolation not in ("namespaces", "audit-hook"):
        raise ValueError(f"isolation must be 'namespaces' or 'audit-hook', got {isolation!r}")
    if isolation == "namespaces" and not namespaces_available(sandbox_uid):
        raise SandboxUnavailable("unshare cannot create user + net + PID namespaces for the sandbox user here")
    return isolation


def _world_executable(path: str) -> bool:
    """Whether any user can run `path`: the file and every directory above it have the others' x bit."""
    p = Path(os.path.realpath(path))
    return all(q.exists() and q.stat().st_mode & stat.S_IXOTH for q in [p, *p.parents])


def interpreter() -> str:
    """Our interpreter when the child keeps our uid or can run it; else a system python3 that anyone can run."""
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    candidate = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if candidate and _world_executable(candidate):
        return candidate
    raise SandboxUnavailable("no python3 that an unprivileged user can execute")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ro_paths(exe: str) -> list[str]:
    """What the jail shows, read-only at the same paths: the system directories and the interpreter's prefixes
    (a virtual environment and the Python it was made from), nothing else of the host."""
    paths = [p for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc") if os.path.lexists(p)]
    prefixes = {os.path.dirname(os.path.dirname(os.path.realpath(exe))), os.path.dirname(os.path.dirname(exe))}
    if exe == sys.executable:
        prefixes |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for p in sorted(map(os.path.realpath, prefixes)):
        if p != "/" and not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths):
            paths.append(p)
    return paths


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int = 8,
               max_file_mb: int = 8, max_output_chars: int = 1 << 16, isolation: str | None = None,
               sandbox_uid: int = 65534, stdin: str | None = None) -> SandboxResult:
    """Run `code` as a script in the sandbox and return its exit status and (truncated) output; `stdin`: the
    text it reads from standard input (default: none, EOF at once)."""
    return _run(code, _choose_isolation(isolation, sandbox_uid), timeout_s=timeout_s, memory_mb=memory_mb,
                max_procs=max_procs, max_file_mb=max_file_mb, max_output_chars=max_output_chars,
                sandbox_uid=sandbox_uid, stdin=stdin)


def _run(code: str, mode: str, *, timeout_s: float, memory_mb: int, max_procs: int, max_file_mb: int,
         max_output_chars: int, sandbox_uid: int, stdin: str | None) -> SandboxResult:
    root = tempfile.mkdtemp(prefix="dsv3-sandbox-")
    work = os.path.join(root, "work")                    # the child's cwd; outputs live beside it, not in it
    try:
        os.mkdir(work)
        Path(work, "main.py").write_text(code)
        exe = interpreter()
        limits = [memory_mb << 20, max_procs, max_file_mb << 20, int(timeout_s) + 1, int(mode == "audit-hook")]
        # what the code may read: the jail's read-only binds, or the audit hook's allow-list (with the cwd)
        jail = dict(ro=_ro_paths(exe))
        source = "import sys\n" + _BOOTSTRAP
        if mode == "namespaces":
            os.mkdir(os.path.join(root, "jail"))
            # scratch space (the cwd and /tmp): tmpfs pages, bounded like the files the code may write
            jail.update(jail=os.path.join(root, "jail"), scratch_mb=max(1, 4 * max_file_mb))
            source = "import sys\n" + _JAIL + _BOOTSTRAP
        limits.append(json.dumps(jail))
        if os.geteuid() == 0:
            for d in (root, work, *([os.path.join(root, "jail")] if mode == "namespaces" else [])):
                os.chown(d, sandbox_uid, sandbox_uid)
        argv = [exe, "-I", "-B", "-c", source, *map(str, limits)]
        if mode == "namespaces":
            argv = [shutil.which("unshare"), *_UNSHARE, "--"] + argv
        if stdin is not None:
            Path(root, "stdin").write_text(stdin)
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err, \
                open(os.path.join(root, "stdin") if stdin is not None else os.devnull, "rb") as inp:
            proc = subprocess.Popen(argv, cwd=work, env={}, stdin=inp, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, **_user(sandbox_uid))
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


@lru_cache(maxsize=8)
def _checked(limits: tuple) -> None:
    r = run_python("print('sandbox ok')", **dict(limits))
    if r.returncode != 0 or r.stdout != "sandbox ok\n":
        raise SandboxUnavailable(f"the sandbox cannot run code here (rc {r.returncode}, {r.isolation}): "
                                 f"{r.stderr[-1000:]}")


def self_check(**limits) -> None:
    """Raise SandboxUnavailable when even `print` fails under these limits (once per set of limits): otherwise
    every sample would score 0, indistinguishable from wrong code, and GRPO would see only all-equal groups."""
    _checked(tuple(sorted(limits.items())))


def run_tests(code: str, tests: str, **limits) -> tuple[bool, SandboxResult]:
    """(whether `code` followed by `tests` (asserts) ran to the end within the limits, the run). "The end" is a
    per-call random nonce printed after the tests, required as the last line of stdout: exiting early with status
    0 (sys.exit(0), os._exit(0)) before the tests run is the known reward hack. Code that reads main.py can still
    find the nonce; this stops the exit-early hack, not a determined reader."""
    self_check(**limits)
    nonce = secrets.token_hex(16)
    result = run_python(f"{code}\n\n{tests}\n\nprint({nonce!r})\n", **limits)
    lines = result.stdout.splitlines()
    return result.returncode == 0 and not result.timed_out and bool(lines) and lines[-1] == nonce, result


def code_reward(code: str, tests: str, **limits) -> float:
    """1.0 when `code` passes `tests` (run_tests), else 0.0."""
    return 1.0 if run_tests(code, tests, **limits)[0] else 0.0
