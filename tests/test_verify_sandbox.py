"""The code sandbox contains what model-written code can do: an infinite loop is killed, a memory bomb fails
under RLIMIT_AS, a bounded fork bomb (200 forks at most) stops at RLIMIT_NPROC and leaves no process behind, a
network connection to a listener of the test is refused, the work directory is removed, the environment is empty."""

import os
import socket
import time

import pytest

from dsv3.verify.sandbox import (SandboxUnavailable, code_reward, namespaces_available, run_python, run_tests,
                                 self_check)


def _gone(pgid: int, wait_s: float = 5.0) -> bool:
    """No process left in the group (killed members are reaped by init, so allow it a moment)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_runs_code_and_removes_its_directory():
    r = run_python("import os\nopen('f.txt', 'w').write('x')\nprint(sorted(os.listdir('.')), os.getcwd())\n"
                   "print({k for k in os.environ if k != 'LC_CTYPE'})")
    assert r.returncode == 0 and not r.timed_out, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("['f.txt', 'main.py']") and lines[1] == "set()"
    assert not os.path.exists(r.workdir)
    assert r.isolation == ("namespaces" if namespaces_available() else "audit-hook")
    assert code_reward("def f(x):\n    return 2 * x", "assert f(3) == 6") == 1.0
    assert code_reward("def f(x):\n    return 2 * x", "assert f(3) == 7") == 0.0
    for hack in ["import sys\nsys.exit(0)", "import os\nos._exit(0)"]:       # exit 0 before the tests run
        assert code_reward(hack, "assert False") == 0.0, hack
    assert run_python("print(input())").returncode != 0          # stdin is at EOF


def test_infinite_loop_is_killed():
    t = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=1.0)
    assert r.timed_out and r.returncode == -9 and time.monotonic() - t < 5
    assert _gone(r.pid)


@pytest.mark.parametrize("bomb", ["x = bytearray(4 << 30)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))"])
def test_memory_bomb_is_contained(bomb):
    r = run_python(bomb, memory_mb=256, timeout_s=5.0)
    assert r.returncode != 0 and not r.timed_out and "MemoryError" in r.stderr, (r.returncode, r.stderr[-500:])


FORK_BOMB = """
import os, time
forked = 0
for _ in range(200):        # bounded: at most 200 forks even if nothing stopped it
    try:
        pid = os.fork()
    except OSError as e:
        print("fork refused", forked, e.errno)
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forked += 1
print("forked", forked)
"""


def test_fork_bomb_is_contained_and_reaped():
    r = run_python(FORK_BOMB, timeout_s=5.0)          # default max_procs = 8
    assert r.returncode == 0 and "fork refused" in r.stdout, (r.stdout, r.stderr)
    forked = int(r.stdout.split()[2])
    assert forked < 8
    assert _gone(r.pid)                  # the sleeping children were killed with the group


def test_no_process_survives_setsid_escape_with_namespaces():
    if not namespaces_available():
        pytest.skip("this kernel refuses unprivileged user namespaces (the audit-hook mode is tested on its own)")
    marker = f"dsv3-sandbox-escapee-{os.getpid()}-{time.monotonic_ns()}"
    code = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'])\n"
            "print('parent done')")
    r = run_python(code)
    assert r.stdout == "parent done\n", r.stderr

    def alive():
        for d in os.listdir("/proc"):
            try:
                if d.isdigit() and marker in open(f"/proc/{d}/cmdline", "rb").read().decode(errors="replace"):
                    return True
            except OSError:
                pass
        return False
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()


@pytest.mark.parametrize("isolation", ["namespaces", "audit-hook"])
def test_network_is_blocked(isolation):
    if isolation == "namespaces" and not namespaces_available():
        pytest.skip("this kernel refuses unprivileged user namespaces (the audit-hook mode is tested on its own)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(0.1)
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                f"    print('connected')\nexcept OSError as e:\n    print('blocked', type(e).__name__)")
        r = run_python(code, isolation=isolation)
        assert r.stdout.startswith("blocked"), (r.stdout, r.stderr)
        with pytest.raises(TimeoutError):
            server.accept()


def test_audit_hook_mode_blocks_other_programs():
    for code in ["import os\nos.system('/bin/echo escaped')", "import subprocess\nsubprocess.run(['/bin/true'])",
                 "import os\nos.execv('/bin/echo', ['echo', 'escaped'])"]:
        r = run_python(code, isolation="audit-hook")
        assert r.returncode != 0 and "escaped" not in r.stdout and "blocked in the sandbox" in r.stderr, code


def test_self_check_turns_a_dead_sandbox_into_an_error():
    with pytest.raises(SandboxUnavailable, match="cannot run code"):
        self_check(max_file_mb=0)                # stdout is a file: its first byte is over RLIMIT_FSIZE


def test_stdin_is_the_given_text_and_not_in_the_work_directory():
    r = run_python("import os, sys\nprint(sys.stdin.read()[::-1], sorted(os.listdir('.')))", stdin="abc\n")
    assert r.returncode == 0 and r.stdout == "\ncba ['main.py']\n", (r.stdout, r.stderr)
    ok, r = run_tests("def f():\n    return input()", "assert f() == 'x'", stdin="x\n")
    assert ok and r.returncode == 0
