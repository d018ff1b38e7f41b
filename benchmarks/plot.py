#!/usr/bin/env python3
"""Plots `mlstm bench` results (JSON) like the TFLA paper's figures.

  /usr/bin/python3 benchmarks/plot.py bench.json [more.json ...] --out plots/

Writes:
  sequence_sweep_<pass>.png   median time vs sequence length (B*S fixed), one line per kernel and chunk size
  head_dim_sweep.png          tokens/s vs head dimension
  device_scaling.png          tokens/s vs device set (strong and weak scaling through the flow graph)
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    rows, machines = [], []
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        machines.append(doc.get("machine", {}))
        rows.extend(doc.get("results", []))
    return rows, machines


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
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def device_scaling(rows, machines, out):
    sel = [r for r in rows if str(r.get("sweep", "")).endswith(tuple(f"devices={n}" for n in range(1, 65)))]
    if not sel:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scaling in ("strong", "weak", "streaming"):
        pts = [(r["kernel"], r["tokens_per_s"]) for r in sel if r["sweep"].startswith(scaling)]
        ax.bar([f"{k}\n{scaling}" for k, _ in pts], [v for _, v in pts], label=scaling)
    ax.set_ylabel("tokens/s")
    ax.set_title(title(machines, "flow graph: device sets (strong / weak scaling, streaming)"))
    ax.tick_params(axis="x", labelsize=6)
    ax.legend()
    path = os.path.join(out, "device_scaling.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="bench JSON files written by `mlstm bench --json-out`")
    ap.add_argument("--out", default="plots", help="output folder")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, machines = load(args.json)
    if not rows:
        print("no results in " + ", ".join(args.json), file=sys.stderr)
        return 2
    written = sequence_sweep(rows, machines, args.out) + head_dim_sweep(rows, machines, args.out) + \
        device_scaling(rows, machines, args.out)
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
