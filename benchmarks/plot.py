#!/usr/bin/env python3
"""Plots `mlstm bench` results (JSON) like the TFLA paper's figures.

  /usr/bin/python3 benchmarks/plot.py bench.json [more.json ...] --out plots/

Writes:
  sequence_sweep_<pass>.png   median time vs sequence length (B*S fixed), one line per kernel and chunk size
  head_dim_sweep.png          tokens/s vs head dimension
  device_scaling_<pass>.png   tokens/s per device set (strong and weak scaling, streaming; through the flow graph and
                              device-resident)
  scaling_efficiency.png      efficiency per OpenCL device count (strong and weak; sequence parallel, head split)
"""
import argparse
import json
import math
import os
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXPECTED = "expected the JSON that `mlstm bench --json-out` writes"
# What every result row needs, for the charts to be drawn: name -> (the types allowed, what the text calls it).
ROW_FIELDS = {
    "pass": (str, "a string"),
    "kernel": (str, "a string"),
    "S": (int, "an integer"),
    "chunk": (int, "an integer"),
    "DHQK": (int, "an integer"),
    "median_ms": ((int, float), "a finite number"),
    "tokens_per_s": ((int, float), "a finite number"),
}


class BadInput(Exception):
    """An input the plots cannot be made from: one line naming the file (exit 2)."""


def check_row(path, i, r):
    where = f"{path}: results[{i}]"
    if not isinstance(r, dict):
        raise BadInput(f"{where} is not an object; {EXPECTED}")
    for name, (types, what) in ROW_FIELDS.items():
        v = r.get(name)
        if isinstance(v, bool) or not isinstance(v, types) or (isinstance(v, float) and not math.isfinite(v)):
            raise BadInput(f"{where}: '{name}' is {'missing' if name not in r else repr(v)}, not {what}; {EXPECTED}")
    if "sweep" in r and not isinstance(r["sweep"], str):
        raise BadInput(f"{where}: 'sweep' is {r['sweep']!r}, not a string; {EXPECTED}")


def load_one(path):
    """The rows and machine of one bench JSON file; BadInput (naming it) when it is missing, unreadable, not JSON
    or not shaped like `mlstm bench --json-out` output."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInput(f"{path}: not JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                       f"{EXPECTED}") from None
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: the top level is a {type(doc).__name__}, not an object; {EXPECTED}")
    rows = doc.get("results")
    if not isinstance(rows, list):
        raise BadInput(f"{path}: no 'results' list; {EXPECTED}")
    machine = doc.get("machine", {})
    if not isinstance(machine, dict):
        raise BadInput(f"{path}: 'machine' is not an object; {EXPECTED}")
    for i, r in enumerate(rows):
        check_row(path, i, r)
    return rows, machine


def load(paths):
    rows, machines = [], []
    for p in paths:
        r, m = load_one(p)
        machines.append(m)
        rows.extend(r)
    return rows, machines


def save(fig, path):
    """fig as a PNG at path, replaced atomically: written to a temporary file in the same folder, flushed and
    synced, then renamed over path; the temporary file is removed when anything fails."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.tight_layout()
            fig.savefig(f, format="png", dpi=120)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        plt.close(fig)
    try:  # the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def title(machines, what):
    m = machines[0] if machines else {}
    return f"{what}\n{m.get('cpu', '?')} ({m.get('cores', '?')} cores)"


def sequence_sweep(rows, machines, out):
    written = []
    for pass_name in sorted({r["pass"] for r in rows if not r.get("sweep")}):
        sel = [r for r in rows if r["pass"] == pass_name and not r.get("sweep")]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in sorted({(r["kernel"], r["chunk"]) for r in sel}):
            pts = sorted((r["S"], r["median_ms"]) for r in sel if (r["kernel"], r["chunk"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} (chunk {key[1]})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (B*S fixed)")
        ax.set_ylabel("median time [ms]")
        ax.set_title(title(machines, f"constant-token sweep, {pass_name}"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = os.path.join(out, f"sequence_sweep_{pass_name}.png")
        save(fig, path)
        written.append(path)
    return written


def head_dim_sweep(rows, machines, out):
    sel = sorted((r["DHQK"], r["tokens_per_s"]) for r in rows if r.get("sweep") == "head_dim")
    if not sel:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s[0] for s in sel], [s[1] for s in sel], marker="o")
    ax.set_xlabel("head dimension (DHQK = DHHV)")
    ax.set_ylabel("tokens/s")
    ax.set_title(title(machines, "head dimension sweep"))
    ax.grid(True, alpha=0.3)
    path = os.path.join(out, "head_dim_sweep.png")
    save(fig, path)
    return [path]


def device_scaling(rows, machines, out):
    sel = [r for r in rows if str(r.get("sweep", "")).endswith(tuple(f"devices={n}" for n in range(1, 65)))]
    if not sel:
        return []
    written = []
    for pass_name in sorted({r["pass"] for r in sel}):
        part = [r for r in sel if r["pass"] == pass_name]
        labels = [f'{r["kernel"]}  {r["sweep"].split()[0].replace("_scaling", "")}  S={r["S"]}' for r in part]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(part) + 1.5))
        colours = {"strong": "tab:blue", "weak": "tab:orange", "streaming": "tab:green"}
        ax.barh(range(len(part)), [r["tokens_per_s"] for r in part],
                color=[colours.get(r["sweep"].split("_")[0].split()[0], "tab:gray") for r in part])
        ax.set_yticks(range(len(part)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s")
        ax.set_title(title(machines, f"flow graph per device set, {pass_name} (blue strong, orange weak, green streaming)"))
        path = os.path.join(out, f"device_scaling_{pass_name}.png")
        save(fig, path)
        written.append(path)
    written += scaling_efficiency(sel, machines, out)
    return written


def scaling_efficiency(sel, machines, out):
    """Efficiency per device count: strong = T(1) / (n T(n)) on the same sequence, weak = T(1) / T(n) with
    n times the tokens, per pass and mode (the graph from host memory or device-resident; sequence parallel or
    head split), over the OpenCL device sets (the
    CPU-worker sets are left out: their device count is NUMA nodes, not GPUs)."""
    def devices(r):
        return int(r["sweep"].split("devices=")[1])
    def mode(r):
        path = "resident" if r["kernel"].startswith("resident[") else "graph"
        return path + (" head split" if "head split" in r["kernel"] else " sequence parallel")
    gpu = [r for r in sel if "workers" not in r["kernel"] and not r["sweep"].startswith("streaming")]
    lines = {}
    for r in gpu:
        key = (r["pass"], r["sweep"].split("_")[0], mode(r))
        lines.setdefault(key, []).append((devices(r), r["median_ms"]))
    series = {}
    for key, pts in lines.items():
        pts.sort()
        if len(pts) < 2 or pts[0][0] != 1:
            continue
        t1 = pts[0][1]
        series[key] = [(n, t1 / (n * t) if key[1] == "strong" else t1 / t) for n, t in pts]
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (pass_name, scaling, m), pts in sorted(series.items()):
        ax.plot([n for n, _ in pts], [e for _, e in pts], marker="o", label=f"{scaling}, {m}, {pass_name}")
        for n, e in pts:
            print(f"scaling efficiency: {pass_name} {scaling} {m}: {n} devices {e:.1%}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("devices")
    ax.set_ylabel("efficiency")
    ax.set_title(title(machines, "scaling efficiency (graph and device-resident)"))
    ax.legend(fontsize=7)
    path = os.path.join(out, "scaling_efficiency.png")
    save(fig, path)
    return [path]


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="bench JSON files written by `mlstm bench --json-out`")
    ap.add_argument("--out", default="plots", help="output folder")
    args = ap.parse_args(argv)
    try:  # every input read and checked before anything is created
        rows, machines = load(args.json)
    except BadInput as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("plot.py: no results in " + ", ".join(args.json), file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"plot.py: --out {args.out}: the folder cannot be made ({e.strerror or e})", file=sys.stderr)
        return 2
    try:
        written = sequence_sweep(rows, machines, args.out) + head_dim_sweep(rows, machines, args.out) + \
            device_scaling(rows, machines, args.out)
    except OSError as e:
        print(f"plot.py: --out {args.out}: a plot cannot be written ({e.strerror or e})", file=sys.stderr)
        return 1
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
