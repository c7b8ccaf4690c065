"""Starting a run in its directory: what a fresh start, `--overwrite` and `--resume` each find acceptable there, which
checkpoint a resume takes (and the newer ones it sets aside, never overwritten: set_aside_newer), and the commands
that continue a run (printed when it stops).

A run directory holds what `dsv3 train` writes (RUN_FILES) and nothing of a run may be mixed with an earlier one:
a fresh start refuses a directory holding checkpoints (continue it with --resume) or an earlier start's metrics
(its steps would interleave with the new ones); --overwrite starts afresh, deleting what a run wrote of RUN_FILES
(file by file: a user's file inside checkpoints/ or tensorboard/ stays, and so does checkpoints/rewound/) and
nothing else the directory holds. check_start reads files only, so every rank of a torchrun job reaches the same answer;
a resume's checkpoint is verified by every rank, each its share of the checksums (choose_checkpoint).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import time
from pathlib import Path
from typing import IO

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..checkpoint.atomic import fsync_path
from .checkpoint import (checkpoint_dirs, checkpoint_path, checkpoint_step, is_suspect, last_healthy, latest_checkpoint,
                         remove_unfinished_saves, verify_checkpoint)
from .step_dirs import delete_checkpoint
from .metrics import METRICS_FILE

RUN_FILES = ("checkpoints", METRICS_FILE, "tensorboard", "plots", "baselines.json", "config.json", "tokenizer")


def is_run_config(path: Path) -> bool:
    """Whether `path` is the config.json a run writes (a RunConfig's dict: `model` and `train` tables), not, say, a
    Hugging Face model's."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("model"), dict) and isinstance(d.get("train"), dict)


def foreign_run_files(run_dir: Path) -> list[str]:
    """The RUN_FILES names in run_dir that no run wrote: every one present when the directory is not a run's (its
    config.json is not a run config and it has no checkpoint), e.g. a model directory's config.json and tokenizer/.
    A start would overwrite them, --overwrite delete them."""
    present = [n for n in RUN_FILES if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if not present or is_run_config(run_dir / "config.json") or latest_checkpoint(run_dir) is not None:
        return []
    return present


# what a resume may not change: the checkpoint's weights are of this model, its data position counts this token
# stream; everything else (steps, LR and schedule, logging, checkpointing, device, layout) may be overridden
KEPT_ON_RESUME = ("model", "data")
MAY_CHANGE_ON_RESUME = {"data": ("cache_dir",)}


def check_resume_config(run_dir: Path, cfg) -> None:
    """--resume with a RunConfig `cfg`: raise ConfigError naming every key of KEPT_ON_RESUME that differs from the
    run's config.json (keys an older run's file lacks are not compared)."""
    saved_file = run_dir / "config.json"
    if not is_run_config(saved_file):
        return
    saved, new = json.loads(saved_file.read_text()), json.loads(json.dumps(cfg.to_dict()))
    changed = [f"{sec}.{k}={saved[sec][k]!r} -> {v!r}" for sec in KEPT_ON_RESUME if isinstance(saved.get(sec), dict)
               for k, v in new[sec].items() if k in saved[sec] and saved[sec][k] != v
               and k not in MAY_CHANGE_ON_RESUME.get(sec, ())]
    if changed:
        raise ConfigError(f"--resume cannot change {', '.join(changed)}: the checkpoint's weights and data position "
                          f"are of the run's model.* and data.* (only data.cache_dir may move); start a new run "
                          f"instead (train.init_from={str(run_dir)!r} starts from its weights)")
    # the optimizer state's layout: BF16 moments with FP32 masters (whole or split) or torch's AdamW, and whether
    # the weights are BF16 (with a master) or FP32 (their own)
    fixed = [("optim", "state_dtype"), ("optim", "master")] + (
        [("train", "dtype")] if saved.get("optim", {}).get("state_dtype") == "bf16" else [])
    changed = [f"{sec}.{k}={saved[sec][k]!r} -> {new[sec][k]!r}" for sec, k in fixed
               if k in saved.get(sec, {}) and saved[sec][k] != new[sec][k]]
    if changed:
        raise ConfigError(f"--resume cannot change {', '.join(changed)}: the checkpoint's optimizer state is stored "
                          f"in the run's layout; start a new run instead (train.init_from={str(run_dir)!r} starts "
                          f"from its weights)")
    # train.dtype=bf16-params holds the weights themselves in bf16: an fp32-weight run resumed so would round its
    # master weights (and torch AdamW's moments, cast to the parameters' dtype on load) to bf16, silently. The other
    # way (bf16 -> fp32) loses nothing; between auto, fp32 and bf16 only the autocast changes
    was, now = saved.get("train", {}).get("dtype"), new["train"]["dtype"]
    if was is not None and was != "bf16-params" and now == "bf16-params":
        raise ConfigError(f"--resume cannot change train.dtype={was!r} -> {now!r}: the checkpoint's fp32 master "
                          f"weights and AdamW moments would be rounded to bf16; resume with train.dtype={was!r}, or "
                          f"start a new run from its weights in bf16 (train.init_from={str(run_dir)!r})")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_config(config_file: str | Path | None, run_dir: str | Path | None, overrides: list[str]):
    """--resume's RunConfig: the run's config.json plus `overrides` (what the run was, with what the command line
    changes), and the keys where `config_file` (given to find the run) differs from that, which are not applied:
    a resume never reads a TOML edited since the start, so the caller says so rather than ignore it silently."""
    from .config import RunConfig, apply_overrides, load_run_config
    from_file = load_run_config(config_file, overrides) if config_file else None
    saved = Path(run_dir or from_file.run_dir) / "config.json"
    if not saved.exists():
        raise FileNotFoundError(f"--resume: {saved} does not exist")
    if not is_run_config(saved):        # damaged: each checkpoint keeps a copy of the run's config
        last = latest_checkpoint(saved.parent)
        copy = f"; its newest checkpoint holds a copy: cp {shlex.quote(str(last / 'config.json'))} " \
            f"{shlex.quote(str(saved))}" if last else ""
        raise ConfigError(f"--resume: {saved} is not a run's config (unreadable or damaged){copy}")
    cfg = RunConfig.from_dict(apply_overrides(json.loads(saved.read_text()), overrides))
    if from_file is None:
        return cfg, []
    a, b = _flat(json.loads(json.dumps(from_file.to_dict()))), _flat(json.loads(json.dumps(cfg.to_dict())))
    return cfg, [f"{k}={a[k]!r} (run: {b.get(k)!r})" for k in sorted(a) if a[k] != b.get(k)]


def check_start(run_dir: Path, resume: bool, overwrite: bool, cfg=None) -> None:
    """Raise (FileExistsError / FileNotFoundError / ValueError) when a start of this kind must not use run_dir;
    with a resume's `cfg`, also when it changes what a resume keeps (check_resume_config)."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it afresh: pass one of them")
    if run_dir.exists() and not run_dir.is_dir():     # else mkdir's bare "[Errno 17] File exists" at the lock
        raise FileExistsError(f"run_dir {str(run_dir)!r} is a file, not a directory; choose another run_dir")
    ckpt = latest_checkpoint(run_dir)
    if resume:
        if ckpt is None:
            raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
        if cfg is not None:
            check_resume_config(run_dir, cfg)
        return
    init = cfg.train.init_from if cfg is not None else ""
    if overwrite and init and Path(init).resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(f"invalid run config: train.init_from={init!r} is in the run directory {run_dir}, whose "
                          f"checkpoints --overwrite deletes before the weights are read; copy them elsewhere first, or "
                          f"choose another run_dir")
    if foreign := foreign_run_files(run_dir):
        raise FileExistsError(f"{run_dir} is not a run directory but holds {', '.join(foreign)}, which a run "
                              f"{'--overwrite would delete' if overwrite else 'would overwrite'}; choose another "
                              f"run_dir")
    if overwrite:
        return
    if ckpt is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints (latest {ckpt.name}); pass --resume to continue "
                              f"it, --overwrite to start it afresh, or choose another run_dir")
    metrics = run_dir / METRICS_FILE
    if metrics.exists() and metrics.stat().st_size:
        raise FileExistsError(f"{run_dir} holds the {METRICS_FILE} of an earlier start that wrote no checkpoint; "
                              f"pass --overwrite to start afresh (deleting it) or choose another run_dir")


LOCK_FILE = ".dsv3-run.lock"


def lock_run_dir(run_dir: Path, layout, resume: bool, overwrite: bool, cfg) -> IO | None:
    """Claim run_dir for this run (rank 0; every rank must call it): two runs in one directory at once would
    overwrite each other's checkpoints and metrics, and the second's start deletes the first's save in progress
    (its leftovers) or, with --overwrite, everything. A POSIX lock on LOCK_FILE, held while the process lives: the
    kernel (and NFS's lock manager) releases it when the process dies, so a killed run leaves no stale lock; being
    the process's, a second Trainer of the same process is not refused. check_start runs again under the lock (the
    other run may have written since the first check). Returns the open lock file (None on other ranks); refused:
    FileExistsError, said by rank 0, every rank stopping."""
    held, error = None, None
    if layout.is_main:
        try:
            created = (not run_dir.exists(), not (run_dir / LOCK_FILE).exists())
            run_dir.mkdir(parents=True, exist_ok=True)
            held = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held for the run: the lock lives with it)
            held.dsv3_created = created
            try:
                fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held.seek(0)
                holder = held.read().strip() or "unknown"
                held.close()
                held = None
                raise FileExistsError(f"{run_dir} is in use by another run ({holder}); two runs in one directory "
                                      f"would overwrite each other's checkpoints and metrics: wait for it to end "
                                      f"(or stop it), or choose another run_dir") from None
            held.truncate(0)
            held.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
            held.flush()
            check_start(run_dir, resume, overwrite, cfg)
        except (OSError, ValueError) as e:
            error = e
            if held is not None:
                held.close()
    if layout.agree(int(error is not None)):
        if error is None:                   # rank 0 refused: it says why (dsv3.cli)
            error = FileExistsError(f"{run_dir}: refused by rank 0")
            error.said_by_rank_0 = True
        raise error
    return held


def choose_checkpoint(run_dir: Path, layout, explicit: str | None = None, command: str = "train"
                      ) -> tuple[Path, list[str]]:
    """--resume: the newest healthy checkpoint whose files match their manifest, and the lines to log about the newer
    ones it passed over (damaged: one line each; suspect, saved during a loss spike: one line for all, with the
    command that resumes from one of them). `explicit` (--resume-from): that checkpoint of the run, suspect or not,
    refused if damaged. Only suspect checkpoints intact: refused, naming them and the explicit way.
    Every rank checks its share of the checksums (verify_checkpoint's share: rank 0 alone would read the whole
    checkpoint, terabytes for 671B, while the others wait), of rank 0's list of checkpoints and their marks; the
    lowest rank's error, if any, is every rank's (Layout.first_error, a collective, so no rank waits on a rank that
    failed)."""
    def verified(d: Path) -> str:
        error = ""
        try:
            verify_checkpoint(d, (layout.rank, layout.world))
        except CheckpointError as e:
            error = str(e)
        return layout.first_error(error)

    if explicit is not None:
        d = layout.from_rank_0(explicit_checkpoint(run_dir, explicit) if layout.is_main else None)
        if isinstance(d, str):              # rank 0's refusal, every rank's
            err = CheckpointError(d)
        elif error := verified(d):
            err = CheckpointError(f"--resume-from {explicit}: checkpoint {d.name} is damaged: {error}")
        else:
            return d, [f"resuming from {d.name}, saved during a loss spike (suspect), as --resume-from asked"] \
                if layout.from_rank_0(is_suspect(d) if layout.is_main else None) else []
        err.said_by_rank_0 = True
        raise err
    skipped, suspect = [], []
    for step, marked in layout.from_rank_0([(checkpoint_step(d), is_suspect(d)) for d in checkpoint_dirs(run_dir)]
                                           if layout.is_main else None)[::-1]:
        d = checkpoint_path(run_dir, step)
        if marked:              # the state of a loss spike: taken only when asked for by name
            suspect.append(d.name)
            continue
        if not (error := verified(d)):
            if suspect:
                skipped.append(f"skipped the newer checkpoint{'s' * (len(suspect) > 1)} {', '.join(suspect)}, "
                               f"saved during a loss spike (suspect), for the last healthy one {d.name}; to resume "
                               f"from {'one of them' if len(suspect) > 1 else 'it'}: "
                               f"{resume_command(run_dir, layout.world, command=command, checkpoint=suspect[0])}")
            return d, skipped
        skipped.append(f"skipping checkpoint {d.name}: {error}")
    # every rank stops; rank 0 says why (dsv3.cli)
    if suspect:
        err = CheckpointError(
            f"--resume: {run_dir} has no healthy intact checkpoint, only {', '.join(suspect)}, saved during a loss "
            f"spike (suspect){': ' if skipped else ''}{'; '.join(skipped)}; to resume from a suspect one anyway: "
            f"{resume_command(run_dir, layout.world, command=command, checkpoint=suspect[0])}")
    else:
        err = CheckpointError(f"--resume: no checkpoint of {run_dir} is intact: " + "; ".join(skipped))
    err.said_by_rank_0 = True
    raise err


def explicit_checkpoint(run_dir: Path, name: str) -> Path | str:
    """--resume-from's checkpoint of run_dir: a step number, a step directory's name (step_00000006) or its path
    (it must be one of this run's: another run's weights are train.init_from's). A str: why it is refused."""
    dirs = checkpoint_dirs(run_dir)
    have = f"its checkpoints: {', '.join(d.name for d in dirs)}" if dirs else "it has no checkpoint"
    if name.isdigit():
        d = checkpoint_path(run_dir, int(name))
    elif "/" not in name and name.startswith("step_"):
        d = run_dir / "checkpoints" / name
    else:
        d = Path(name)
        if (was := set_aside_name(run_dir, d)) is not None:
            return (f"--resume-from {name}: set aside by an earlier resume that went back past it; to resume from "
                    f"it, move it back to {run_dir / 'checkpoints' / was} first (moving aside the "
                    f"checkpoint of that name, if the run has one)")
        if d.resolve().parent != (run_dir / "checkpoints").resolve():
            return (f"--resume-from {name}: not a checkpoint of the run {run_dir} ({have}); another run's weights "
                    f"are a new run's start: train.init_from")
        d = run_dir / "checkpoints" / d.name
    if d not in dirs:
        return f"--resume-from {name}: {run_dir} has no checkpoint {d.name} ({have})"
    return d


REWOUND = "rewound"      # checkpoints/rewound/: the checkpoints a resume went back past, set aside (never deleted)


def rewound_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / REWOUND


def set_aside_path(run_dir: str | Path, name: str, now: int) -> Path:
    """Where set_aside_newer moves the step directory `name` at unix time `now`: checkpoints/rewound/<name>-<now>,
    or <name>-<now>-<i> for one set aside before in the same second (never renamed over)."""
    aside = rewound_dir(run_dir)
    dest, i = aside / f"{name}-{now}", 1
    while dest.exists():
        dest, i = aside / f"{name}-{now}-{i}", i + 1
    return dest


def _set_aside_parts(path: Path) -> tuple[str, tuple[int, ...]]:
    """<name>-<unix time>[-<i>] -> (name, (time, i...)); stamps that are not numbers sort first, as (-1,)."""
    name, *stamps = path.name.split("-")
    return name, tuple(int(x) for x in stamps) if all(x.isdigit() for x in stamps) else (-1,)


def set_aside_name(run_dir: str | Path, path: Path) -> str | None:
    """The step directory's name that `path` was, if it is one of run_dir's set-aside checkpoints; else None."""
    return _set_aside_parts(path)[0] if path.resolve().parent == rewound_dir(run_dir).resolve() else None


def set_aside_copies(run_dir: str | Path, name: str) -> list[Path]:
    """run_dir's set-aside copies of the step directory `name`, oldest first: by <unix time>, then by the same
    second's -<i> as a number (as text, -10 would sort before -2)."""
    aside = rewound_dir(run_dir)
    found = aside.glob(f"{name}-*") if aside.is_dir() else []
    return sorted(found, key=lambda p: _set_aside_parts(p)[1])


def set_aside_newer(run_dir: Path, ckpt: Path, layout) -> str | None:
    """A resume from `ckpt` trains on past its step: every step directory newer than it (suspect or damaged ones a
    plain --resume passed over, any that --resume-from went back past) is another history of those steps, which
    this run's saves would replace (atomic_directory) and its pruning delete, and which a later --resume would take
    over this run's own. Rank 0 renames each, atomically, to checkpoints/rewound/<name>-<unix time> (outside
    checkpoint_dirs: nothing resumes from, counts or prunes it; moving it back makes it a checkpoint again); every
    rank calls this (rank 0's outcome is every rank's: Layout.from_rank_0). Returns the line to log (None: nothing
    newer); a rename that fails stops the run before it trains (CheckpointError, said by rank 0)."""
    def move() -> tuple[str | None, str]:
        newer = [d for d in checkpoint_dirs(run_dir) if d.name > ckpt.name]
        if not newer:
            return None, ""
        aside, now, moved = rewound_dir(run_dir), int(time.time()), []
        try:
            aside.mkdir(exist_ok=True)
            for d in newer:
                dest = set_aside_path(run_dir, d.name, now)
                os.rename(d, dest)
                moved.append(f"{d.name} -> {dest}")
            fsync_path(aside)
            fsync_path(aside.parent)
        except OSError as e:
            done = f" (moved so far: {', '.join(moved)})" if moved else ""
            return None, (f"cannot set aside the checkpoints newer than {ckpt.name}, which resuming from it would "
                          f"overwrite, into {aside}: {e}{done}; nothing was deleted")
        return (f"set aside {len(newer)} checkpoint{'s' * (len(newer) > 1)} newer than {ckpt.name}, which this "
                f"resume goes back to, so that this run's saves of the same steps do not overwrite them nor "
                f"checkpoint.keep prune them: {', '.join(moved)}; nothing resumes from, prunes or deletes "
                f"{aside.name}/ (to resume from one, move it back to {run_dir / 'checkpoints'}/step_N)"), ""
    note, error = layout.from_rank_0(move() if layout.is_main else None)
    if error:
        err = CheckpointError(error)
        err.said_by_rank_0 = True
        raise err
    return note


# what a run writes inside RUN_FILES' directories (tensorboard's event files, `dsv3 plot`'s PNGs, the tokenizer's
# two files); --overwrite deletes these and leaves anything else a user put there
_OWN = {"tensorboard": lambda f: f.name.startswith("events.out.tfevents."),
        "plots": lambda f: f.name in ("loss.png", "lr.png", "mtp.png", "maxvio.png", "expert_load.png"),
        "tokenizer": lambda f: f.name in ("tokenizer.json", "tokenizer_config.json")}


def clear_run(run_dir: Path) -> list[str]:
    """--overwrite: delete what an earlier run wrote into run_dir (RUN_FILES), file by file: a checkpoint's saved
    files (not a file a user put in its directory: that directory is set aside into checkpoints/rewound/, where the
    new run's save of the same step cannot replace it), tensorboard's event files, the plots and tokenizer a run
    writes; checkpoints/rewound/ (what resumes set aside: never deleted) and anything else stay, with the
    directories holding them. Returns the names deleted (a directory's with what of it was kept)."""
    if foreign := foreign_run_files(run_dir):
        raise FileExistsError(f"{run_dir} is not a run directory; not deleting {', '.join(foreign)}")
    gone = []
    for name in RUN_FILES:
        p = run_dir / name
        if not (p.exists() or p.is_symlink()):
            continue
        if not p.is_dir() or p.is_symlink():
            p.unlink()
            gone.append(name)
            continue
        if name == "checkpoints":
            remove_unfinished_saves(run_dir)
            now = int(time.time())
            for d in checkpoint_dirs(run_dir):
                delete_checkpoint(d)
                if d.exists():          # a user's files: out of the way of the new run's save of that step (which
                    rewound_dir(run_dir).mkdir(exist_ok=True)      # replaces the directory whole)
                    os.rename(d, set_aside_path(run_dir, d.name, now))
        else:
            for f in sorted(p.rglob("*"), reverse=True):       # files before the directories holding them
                if f.is_file() and not f.is_symlink() and _OWN[name](f):
                    f.unlink()
        for d in sorted((q for q in p.rglob("*") if q.is_dir() and not q.is_symlink()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
        kept = sorted(str(q.relative_to(run_dir)) for q in p.iterdir())
        if not kept:
            p.rmdir()
        gone.append(name if not kept else f"{name} (kept: {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''})")
    return gone


def release_unused_run_dir(run_dir: Path, held: IO | None) -> None:
    """A start that failed after lock_run_dir (rank 0's `held`, None elsewhere): the lock file it created is
    removed, and the directory too if the lock created it and nothing else is there (its refusal wrote nothing)."""
    if held is None:
        return
    created_dir, created_file = getattr(held, "dsv3_created", (False, False))
    try:
        held.close()
        if created_file:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
        if created_dir and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        pass


def _launcher(world: int, command: str = "train") -> str:
    if world == 1:
        return f"dsv3 {command}"
    nodes = "--standalone " if int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world else "<your torchrun options> "
    return f"torchrun {nodes}--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)} -m dsv3.cli {command}"


def resume_command(run_dir: Path, world: int, *overrides: str, command: str = "train",
                   checkpoint: str | None = None) -> str:
    """The command that continues the run from its newest healthy checkpoint, or from `checkpoint` (a step
    directory's name: --resume-from) (run_dir/config.json holds the config); `command`: the dsv3 subcommand that
    trains it (train, sft, grpo, distill)."""
    how = ["--resume-from", checkpoint] if checkpoint else ["--resume"]
    return " ".join([_launcher(world, command), *how, "--run-dir", shlex.quote(str(run_dir)),
                     *map(shlex.quote, overrides)])


def resume_advice(run_dir: Path, newest: Path, world: int, command: str = "train") -> str:
    """"Resume with: ..." for a run whose newest checkpoint is `newest`: a plain --resume, unless `newest` is suspect
    (saved during a loss spike), which a plain --resume passes over for the last healthy one: then both ways, or
    only the explicit one where no healthy checkpoint precedes it."""
    plain = resume_command(run_dir, world, command=command)
    if not is_suspect(newest):
        return f"Resume with: {plain}"
    explicit = resume_command(run_dir, world, command=command, checkpoint=newest.name)
    healthy = last_healthy([d for d in checkpoint_dirs(run_dir) if d.name < newest.name])
    if healthy is None:
        return f"No healthy checkpoint precedes it: resume from it with: {explicit}"
    return f"Resume with: {plain} (from the last healthy checkpoint {healthy.name}), or from {newest.name}: {explicit}"


# the file a command's --config reads back: `dsv3 train` its RunConfig; sft / grpo / distill the run file with their
# [sft] / [grpo] / [distill] table (dsv3.posttrain), which config.json (the RunConfig alone) lacks
RESTART_CONFIG = {"train": "config.json"}
POSTTRAIN_CONFIG = "posttrain.json"


def restart_command(run_dir: Path, world: int, *overrides: str, command: str = "train") -> str:
    """The command that starts the run afresh with its own config (and `overrides`)."""
    config = run_dir / RESTART_CONFIG.get(command, POSTTRAIN_CONFIG)
    return " ".join([_launcher(world, command), "--overwrite", "--config", shlex.quote(str(config)),
                     *map(shlex.quote, overrides)])


def divergence_advice(run_dir: Path, world: int, lr: float, command: str = "train") -> str:
    """Where a diverged run can go back to: its last healthy checkpoint, which precedes the blow-up (the trainer
    writes a periodic checkpoint only once the next step vetted its weights; a signal's or final save during a spike
    is marked suspect), with a tenth of the LR; or, without one, a fresh start. Every checkpoint left is this run's
    past: a resume that went back set the newer ones aside first (`set_aside_newer`), so a plain --resume takes it."""
    dirs, lower = checkpoint_dirs(run_dir), f"optim.lr={lr / 10:g}"
    last = last_healthy(dirs)
    if last is None:
        suspect = [d.name for d in dirs]
        if suspect:             # only saves of a loss spike: --overwrite would delete them, so name both ways
            return (f"No healthy checkpoint precedes it, only {', '.join(suspect)}, saved during a loss spike "
                    f"(suspect): resume from one with a lower optim.lr (now {lr:g}): "
                    f"{resume_command(run_dir, world, lower, command=command, checkpoint=suspect[-1])}, or start "
                    f"afresh (deleting them): {restart_command(run_dir, world, lower, command=command)}")
        return (f"No checkpoint precedes it: start afresh with a lower optim.lr (now {lr:g}) or a longer "
                f"optim.warmup: {restart_command(run_dir, world, lower, command=command)}")
    return (f"Last healthy checkpoint: {last.name}. Lower optim.lr (now {lr:g}) or raise optim.warmup and resume "
            f"from it: {resume_command(run_dir, world, lower, command=command)}")


def _free_space(path: Path) -> str:
    """The free space of the file system holding `path` (its nearest existing parent), e.g. "1.2 GB"."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 1e9:.1f} GB" if free >= 1e8 else f"{free / 1e6:.1f} MB"


def _first_line(e: BaseException) -> str:
    """What went wrong, in a line: DCP's CheckpointException wraps each failing rank's exception (the first one)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = next(iter(failures.items()))
        cause = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_first_line(cause)}"
    text = str(e).strip().split("\n")[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def write_failure(target: Path, e: BaseException, world: int, command: str = "train") -> str:
    """The one line for a checkpoint save that failed: the checkpoint, the cause, the free space there, and what
    to do (the earlier checkpoints are intact: the save is atomic): resume_advice's way back, which for a newest
    checkpoint saved during a loss spike names both the last healthy one and --resume-from."""
    run_dir = target.parent.parent
    last = latest_checkpoint(run_dir)
    head = (f"cannot write checkpoint {target} ({_first_line(e)}; {_free_space(target)} free there); nothing of it "
            f"was kept")
    if last is None:
        return (f"{head} and the run has no earlier checkpoint: free space (or restore write permission) and start "
                f"again: {restart_command(run_dir, world, command=command)}")
    spike = ", saved during a loss spike (suspect)" if is_suspect(last) else ""
    return (f"{head}, the earlier checkpoints are intact (newest {last.name}{spike}): free space (or restore write "
            f"permission). {resume_advice(run_dir, last, world, command)}")
