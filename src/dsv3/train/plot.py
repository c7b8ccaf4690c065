"""PNG plots of a run's metrics.jsonl (see dsv3.train.metrics for the schema), and overlays of several runs.

    python -m dsv3.train.plot RUN_DIR                           # RUN_DIR/plots/*.png
    python -m dsv3.train.plot A B C --compare val_loss -o cmp.png

matplotlib is imported inside the functions with the Agg backend, so importing this module costs nothing and
works on headless machines.
"""

import argparse
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .metrics import _metrics_path, read_metrics

MAX_HEATMAP_LAYERS = 8


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have a finite-or-NaN number under `key`; a step logged twice (a resume
    without truncate_after) keeps its last value."""
    by_step = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            by_step[r["step"]] = float(v)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def _pick_layers(n: int, cap: int = MAX_HEATMAP_LAYERS) -> list[int]:
    """Up to `cap` evenly spaced layer indices out of n, always including the first and the last."""
    if n <= cap:
        return list(range(n))
    return sorted({round(i) for i in np.linspace(0, n - 1, cap)})


def _save(plt, fig, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def _load_baselines(run_dir: Path, baselines: dict[str, float] | None) -> dict[str, float]:
    out = {}
    f = run_dir / "baselines.json"
    if f.is_file():
        try:
            out.update({str(k): float(v) for k, v in json.loads(f.read_text()).items()})
        except (ValueError, TypeError, AttributeError) as e:
            warnings.warn(f"ignoring unreadable {f}: {e}")
    out.update(baselines or {})
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             baselines: dict[str, float] | None = None) -> list[Path]:
    """Write loss.png and, when the data is there, lr.png, mtp.png, maxvio.png and expert_load.png to out_dir
    (default RUN_DIR/plots); returns the files written. baselines (name -> loss, e.g. a unigram entropy) are drawn
    as dashed lines on loss.png, together with those in RUN_DIR/baselines.json."""
    run_dir = Path(run_dir)
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise ValueError(f"no metrics file at {path}")
    records = read_metrics(path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if not train and not val:
        raise ValueError(f"{path} has no train or val records to plot")
    out_dir = Path(out_dir) if out_dir is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    name = path.parent.name
    written: list[Path] = []

    _plot_loss(plt, train, val, _load_baselines(path.parent, baselines), name, out_dir / "loss.png", written)
    _plot_schedule(plt, train, name, out_dir / "lr.png", written)
    _plot_mtp(plt, train, val, name, out_dir / "mtp.png", written)

    vio = [(r["step"], r["max_vio"], r.get("moe_layers")) for r in train if r.get("max_vio")]
    if vio:
        _plot_maxvio(plt, vio, name, out_dir / "maxvio.png", written)

    load = [(r["step"], r["expert_load"], r.get("moe_layers")) for r in train if r.get("expert_load")]
    if load:
        _plot_expert_load(plt, load, name, out_dir / "expert_load.png", written)
    return written


def _plot_loss(plt, train: list, val: list, baselines: dict[str, float], name: str, path: Path,
               written: list[Path]) -> None:
    """Main loss is the quantity to read; total (with MTP and aux terms) is drawn faintly for reference."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    s, v = _series(train, "main_loss")
    if len(s):
        ax.plot(s, v, color="C0", lw=1.2, label="train main loss")
    s, v = _series(train, "loss")
    if len(s):
        ax.plot(s, v, color="C0", lw=0.8, alpha=0.3, label="train total loss")
    s, v = _series(val, "val_loss")
    if len(s):
        ax.plot(s, v, "o-", color="C3", ms=4, lw=1.5, label="val loss")
    for i, (label, y) in enumerate(baselines.items()):
        ax.axhline(y, ls="--", lw=1, color=f"C{(i + 4) % 10}", label=f"{label} ({y:.3g})")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"Loss — {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path, written)


def _plot_schedule(plt, train: list, name: str, path: Path, written: list[Path]) -> None:
    """The learning rate and, on a twin axis, the batch size (its ramp), where the records have them."""
    s, v = _series(train, "lr")
    if not len(s):
        return
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    ax.plot(s, v, color="C0", label="learning rate")
    ax.set(xlabel="step", ylabel="learning rate", title=f"Schedule — {name}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    bs, bv = _series(train, "batch_size")
    if len(bs):
        ax2 = ax.twinx()
        handles += ax2.plot(bs, bv, color="C1", drawstyle="steps-post", label="batch size (sequences)")
        ax2.set_ylabel("batch size (sequences)")
    # the legend goes on the topmost (twin) axes, or that axes' lines would be drawn over it
    fig.axes[-1].legend(handles=handles, labels=[h.get_label() for h in handles], loc="best")
    _save(plt, fig, path, written)


def _plot_mtp(plt, train: list, val: list, name: str, path: Path, written: list[Path]) -> None:
    """Train and val MTP loss and, on a twin axis, the val MTP head's next-next-token accuracy, where logged."""
    mtp = [_series(train, "mtp_loss"), _series(val, "val_mtp_loss"), _series(val, "val_mtp_acc")]
    if not any(len(s) for s, _ in mtp):
        return
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    handles = []
    if len(mtp[0][0]):
        handles += ax.plot(*mtp[0], color="C0", lw=1, label="train MTP loss")
    if len(mtp[1][0]):
        handles += ax.plot(*mtp[1], "o-", color="C3", ms=4, label="val MTP loss")
    ax.set(xlabel="step", ylabel="MTP loss (nats/token)", title=f"Multi-token prediction — {name}")
    ax.grid(alpha=0.3)
    if len(mtp[2][0]):
        ax2 = ax.twinx()
        handles += ax2.plot(*mtp[2], "s--", color="C2", ms=4, label="val MTP top-1 acc")
        ax2.set_ylabel("val MTP next-next-token accuracy")
    # the legend goes on the topmost (twin) axes, or that axes' lines would be drawn over it
    fig.axes[-1].legend(handles=handles, labels=[h.get_label() for h in handles], loc="best")
    _save(plt, fig, path, written)


def _layer_names(rows: list, n: int) -> list[str]:
    names = rows[-1][2]
    return [str(x) for x in names] if names and len(names) == n else [f"MoE layer {i}" for i in range(n)]


def _plot_maxvio(plt, rows: list, name: str, path: Path, written: list[Path]) -> None:
    n = len(rows[-1][1])
    rows = [r for r in rows if len(r[1]) == n]  # a record from another model shape would misalign the layers
    steps = np.array([r[0] for r in rows])
    vals = np.array([r[1] for r in rows], dtype=np.float64)  # [T, layers]
    names = _layer_names(rows, n)
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, n))
    for i in range(n):  # colour follows depth, so many layers still read as a gradient without a legend
        ax.plot(steps, vals[:, i], color=colors[i], lw=1, alpha=0.8, label=names[i] if n <= 12 else None)
    ax.plot(steps, vals.mean(1), color="black", lw=2, label="mean over layers")
    pos = vals[vals > 0]
    if pos.size and pos.max() / pos.min() > 20:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="MaxVio = max load / mean load − 1",
           title=f"Expert load imbalance — {name}" + (f" ({n} layers, shallow→deep = purple→yellow)" if n > 12 else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", ncol=2 if n > 5 else 1)
    _save(plt, fig, path, written)


def _plot_expert_load(plt, rows: list, name: str, path: Path, written: list[Path]) -> None:
    from matplotlib.colors import TwoSlopeNorm

    n = len(rows[-1][1])
    rows = [r for r in rows if len(r[1]) == n and all(len(x) == len(rows[-1][1][i]) for i, x in enumerate(r[1]))]
    steps = np.array([r[0] for r in rows], dtype=np.float64)
    names = _layer_names(rows, n)
    # cell edges halfway between logged steps, so irregular logging (resumes, changed intervals) stays honest
    mid = (steps[1:] + steps[:-1]) / 2 if len(steps) > 1 else np.array([])
    first = steps[0] - (mid[0] - steps[0] if len(mid) else 0.5)
    last = steps[-1] + (steps[-1] - mid[-1] if len(mid) else 0.5)
    edges = np.concatenate([[first], mid, [last]])
    picked = _pick_layers(n)
    data = {i: np.array([r[1][i] for r in rows], dtype=np.float64).T for i in picked}  # [E, T] each
    vmax = max(2.0, max(float(np.nanmax(d)) for d in data.values()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)  # white = perfectly balanced (load = mean)
    ncols = 1 if len(picked) <= 2 else 2
    nrows = math.ceil(len(picked) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 2.4 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    for ax, i in zip(axes.flat, picked):
        d = data[i]
        mesh = ax.pcolormesh(edges, np.arange(d.shape[0] + 1) - 0.5, d, cmap="RdBu_r", norm=norm, shading="flat")
        ax.set(title=names[i], xlabel="step", ylabel="expert")
    for ax in axes.flat[len(picked):]:
        ax.axis("off")
    suffix = f" ({len(picked)} of {n} layers)" if len(picked) < n else ""
    fig.suptitle(f"Expert load / mean load — {name}{suffix}")
    fig.colorbar(mesh, ax=axes, label="load / mean (1 = balanced)", shrink=0.9)
    _save(plt, fig, path, written)


def compare_runs(run_dirs: dict[str, str | Path], out_path: str | Path, metric: str = "val_loss",
                 x: str = "step", logy: bool = False) -> Path:
    """Overlay `metric` (a key of train or val records, e.g. val_loss, main_loss, max_vio_mean) from several runs,
    labelled by the dict keys. x="tokens" plots against cumulative training tokens (interpolated from the train
    records), which is the fair axis when runs differ in batch size. Runs without the metric are skipped with a
    warning; ValueError if none has it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    plotted = 0
    for label, run in run_dirs.items():
        records = [r for r in read_metrics(_metrics_path(run)) if r.get("kind") in ("train", "val")]
        s, v = _series([r for r in records if metric in r], metric)
        if not len(s):
            warnings.warn(f"run {label!r} ({run}) has no {metric!r}")
            continue
        if x == "tokens":
            ts, tv = _series(records, "tokens")
            if not len(ts):
                warnings.warn(f"run {label!r} ({run}) has no 'tokens'")
                continue
            s = np.interp(s, ts, tv)
        ax.plot(s, v, "o-" if len(s) <= 50 else "-", ms=3, lw=1.3, label=label)
        plotted += 1
    if not plotted:
        plt.close(fig)
        raise ValueError(f"none of the runs {list(run_dirs)} has metric {metric!r}")
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=x, ylabel=metric, title=f"{metric} by run")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Plot dsv3 training metrics (metrics.jsonl).")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl files)")
    p.add_argument("--compare", metavar="METRIC", help="overlay METRIC across runs instead of per-run plots")
    p.add_argument("--x", default="step", choices=["step", "tokens"])
    p.add_argument("--logy", action="store_true")
    p.add_argument("-o", "--out", type=Path, help="output file (--compare) or directory (per-run plots)")
    args = p.parse_args(argv)
    if args.compare:
        out = args.out or Path(f"compare_{args.compare}.png")
        runs = {r.name if r.is_dir() else r.parent.name: r for r in args.runs}
        print(compare_runs(runs, out, args.compare, x=args.x, logy=args.logy))
    else:
        for r in args.runs:
            for f in plot_run(r, args.out / r.name if args.out and len(args.runs) > 1 else args.out):
                print(f)


if __name__ == "__main__":
    main()
