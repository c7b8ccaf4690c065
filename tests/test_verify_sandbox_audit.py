"""Audit of the code sandbox as untrusted model output would probe it (issue: post-training/eval audit): the user's
files (the repository, the home directory) cannot be read or listed, nothing can be written outside the run's own
scratch space (the host's /tmp and /dev/shm included), other processes' command lines are not visible, a flood of
output or of scratch files is bounded, and each of these scores as a failed sample, never a crash or a hang."""

import os
import time
import uuid

import pytest

import dsv3.verify.sandbox as sandbox_module
from dsv3.posttrain.tasks import Task, verify
from dsv3.verify.sandbox import code_reward, namespaces_available, run_python

MODES = ["namespaces", "audit-hook"]


def _mode(isolation: str) -> str:
    if isolation == "namespaces" and not namespaces_available():
        pytest.skip("this kernel refuses unprivileged user namespaces (the audit-hook mode is tested on its own)")
    return isolation


def _attempts(code_lines: dict[str, str]) -> str:
    """A program that tries each snippet and prints `name ok` or `name blocked`."""
    out = []
    for name, snippet in code_lines.items():
        out.append(f"try:\n    {snippet}\n    print({name!r}, 'ok')\nexcept Exception as e:\n"
                   f"    print({name!r}, 'blocked', type(e).__name__)")
    return "\n".join(out)


@pytest.mark.parametrize("isolation", MODES)
def test_users_files_are_out_of_reach(isolation):
    mode = _mode(isolation)
    tag = uuid.uuid4().hex
    outside = [f"/tmp/dsv3-sandbox-escape-{tag}", f"/dev/shm/dsv3-sandbox-escape-{tag}"]
    repo_file = os.path.abspath(sandbox_module.__file__)          # world-readable source of this repository
    home = os.path.expanduser("~")
    code = _attempts({
        "read_repo": f"open({repo_file!r}).read()",
        "list_repo": f"__import__('os').listdir({os.path.dirname(repo_file)!r})",
        "list_home": f"__import__('os').listdir({home!r})",
        "write_tmp": f"open({outside[0]!r}, 'w').write('x')",
        "write_shm": f"open({outside[1]!r}, 'w').write('x')",
        "own_dir": "open('mine.txt', 'w').write('x')",
    })
    r = run_python(code, isolation=mode)
    got = dict(line.split()[:2] for line in r.stdout.splitlines())
    # namespaces: /tmp is the jail's own tmpfs, so the write succeeds there and is gone with the run
    assert got == {"read_repo": "blocked", "list_repo": "blocked", "list_home": "blocked",
                   "write_tmp": "ok" if mode == "namespaces" else "blocked", "write_shm": "blocked",
                   "own_dir": "ok"}, (r.stdout, r.stderr)
    for path in outside:
        assert not os.path.exists(path)
    # as a reward: code that only "passes" by reading the user's files is a failure (the read raises)
    assert code_reward(f"print(open({repo_file!r}).read())", "assert True", isolation=mode) == 0.0


def test_namespaces_hide_other_processes_and_hold_no_capabilities():
    _mode("namespaces")
    code = ("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()] if os.path.isdir('/proc') else []\n"
            "print('pids', len(pids))\n"
            "status = open('/proc/self/status').read() if pids else 'CapEff:\\t0000000000000000'\n"
            "print([l.split()[1] for l in status.splitlines() if l.startswith('CapEff')][0])\n"
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print('remount', libc.mount(None, b'/usr', None, ctypes.c_ulong(32 | 4096), None))\n"   # rw again?
            "try:\n    open('/usr/escape', 'w')\n    print('wrote /usr')\nexcept OSError as e:\n"
            "    print('usr', e.errno)")
    r = run_python(code, isolation="namespaces")
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stderr
    assert int(lines[0].split()[1]) <= 2             # itself (and at most a helper): no host process is listed
    assert int(lines[1], 16) == 0                    # no capability left
    assert lines[2] == "remount -1" and lines[3].startswith("usr ")


def test_namespaces_scratch_space_is_bounded():
    _mode("namespaces")
    code = ("import os\nn = 0\ntry:\n    for i in range(100):\n        open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n"
            "        n += 1\nexcept OSError as e:\n    print('stopped', n, e.errno)")
    t = time.monotonic()
    r = run_python(code, isolation="namespaces", max_file_mb=8, timeout_s=20)
    assert r.stdout.startswith("stopped") and int(r.stdout.split()[1]) < 8, (r.stdout, r.stderr)
    assert time.monotonic() - t < 20


@pytest.mark.parametrize("isolation", MODES)
def test_output_flood_is_bounded_and_fails(isolation):
    mode = _mode(isolation)
    flood = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n"      # 100 MB
    t = time.monotonic()
    r = run_python(flood, isolation=mode, max_output_chars=1000)
    assert time.monotonic() - t < 10 and len(r.stdout) == 1000 and r.returncode != 0
    assert code_reward(flood, "assert True", isolation=mode) == 0.0


@pytest.mark.parametrize("response", [
    "```python\nwhile True:\n    pass\n```",
    "```python\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n```",
    "```python\nx = bytearray(8 << 30)\n```",
    "```python\nimport socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n```",
    "```python\nimport os\nprint(open(os.path.expanduser('~/.ssh/id_rsa')).read())\n```",
    "```python\nimport sys\nsys.stdout.write('y' * (100 << 20))\n```",
])
def test_hostile_grpo_responses_score_zero(response):
    task = Task("code", "write f", "", (), 0, "t:1", "assert True")
    t = time.monotonic()
    assert verify(task, response, timeout_s=2.0, memory_mb=256) == 0.0
    assert time.monotonic() - t < 15
