#!/usr/bin/env python3
"""benchmarks/plot.py on bad and good inputs.

  /usr/bin/python3 tests/python/test_plot.py --plot benchmarks/plot.py --work DIR [--mlstm build/tools/mlstm]

Bad inputs (missing, a directory, CSV, not an object, no results list, a row missing a field or holding NaN, a
good file next to a bad one): exit 2, one line on stderr naming the file, no traceback, the --out folder not
created. A good input (a JSON in the shape `mlstm bench --json-out` writes, and with --mlstm a real one): exit 0,
the PNGs written, one that was there replaced, no temporary files left; a PNG whose writing fails leaves the old
one and no temporary file.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys

FAILURES = []


def check(ok, what):
    if not ok:
        FAILURES.append(what)
        print("FAIL: " + what, file=sys.stderr)


def row(**over):
    r = {"B": 4, "DHHV": 16, "DHQK": 16, "NH": 4, "S": 256, "chunk": 64, "dtype": "float32",
         "kernel": "chunkwise--cpu_xl_chunk", "median_ms": 1.96, "pass": "fw", "tokens_per_s": 522840.6}
    r.update(over)
    return r


def good_doc():
    """The shape of `mlstm bench --tokens 1024 --seq-lens 256 512 --head-dims 16 32 --graph-devices workers
    --json-out`: sequence-sweep rows, head_dim rows and device-scaling rows."""
    return {"machine": {"cores": 2, "cpu": "test", "hostname": "vm"}, "revision": "test", "timestamp": "now",
            "results": [row(), row(S=512, B=2, median_ms=0.58, tokens_per_s=1772276.0),
                        row(S=512, B=2, sweep="head_dim"), row(S=512, B=2, DHQK=32, DHHV=32, sweep="head_dim"),
                        row(S=512, B=1, kernel="graph[workers]", sweep="strong_scaling devices=1"),
                        row(S=512, B=1, kernel="graph[workers]", sweep="weak_scaling devices=1"),
                        row(S=512, B=1, kernel="graph[workers]", sweep="streaming pieces=8 devices=1")]}


def run_plot(plot, inputs, out):
    return subprocess.run([sys.executable, plot] + inputs + ["--out", out], capture_output=True, text=True,
                          timeout=120)


def expect_refused(plot, work, name, inputs, named):
    out = os.path.join(work, "out_" + name)
    p = run_plot(plot, inputs, out)
    lines = p.stderr.splitlines()
    check(p.returncode == 2, f"{name}: exit {p.returncode}, expected 2 (stderr {p.stderr!r})")
    check(len(lines) == 1, f"{name}: {len(lines)} lines on stderr, expected one: {p.stderr!r}")
    check("Traceback" not in p.stderr, f"{name}: a traceback: {p.stderr!r}")
    check(bool(lines) and named in lines[0], f"{name}: stderr does not name {named!r}: {p.stderr!r}")
    check(not os.path.exists(out), f"{name}: the --out folder was created")


def expect_plots(plot, work, name, inputs, expected):
    out = os.path.join(work, "out_" + name)
    os.makedirs(out)
    stale = os.path.join(out, "sequence_sweep_fw.png")
    with open(stale, "w") as f:
        f.write("an old plot")
    p = run_plot(plot, inputs, out)
    check(p.returncode == 0, f"{name}: exit {p.returncode} (stderr {p.stderr!r})")
    for png in expected:
        path = os.path.join(out, png)
        with open(path, "rb") if os.path.exists(path) else open(os.devnull, "rb") as f:
            head = f.read(8)
        check(head == b"\x89PNG\r\n\x1a\n", f"{name}: {png} missing or not a PNG")
    left = [f for f in os.listdir(out) if not f.endswith(".png")]
    check(not left, f"{name}: files other than PNGs left in --out: {left}")


def expect_failed_write_leaves_old(plot, work):
    """plot.save on a figure whose PNG fails half-way: the exception, the old file as it was, no temporary."""
    spec = importlib.util.spec_from_file_location("plot_under_test", plot)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = os.path.join(work, "out_failed_write")
    os.makedirs(out)
    path = os.path.join(out, "head_dim_sweep.png")
    with open(path, "w") as f:
        f.write("the old plot")
    fig, _ = mod.plt.subplots()

    def broken(f, **kw):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    fig.savefig = broken
    try:
        mod.save(fig, path)
        check(False, "failed write: save() did not raise")
    except OSError:
        pass
    with open(path) as f:
        check(f.read() == "the old plot", "failed write: the old plot was changed")
    check(os.listdir(out) == ["head_dim_sweep.png"], f"failed write: left {os.listdir(out)}")


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--mlstm")
    args = ap.parse_args(argv)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    def write(name, text):
        path = os.path.join(work, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    good = write("good.json", json.dumps(good_doc()))
    csv = write("b.csv", "kernel,S,B,chunk,pass,median_ms,tokens_per_s\nchunkwise--cpu_xl_chunk,256,4,64,fw,1.9,5e5\n")
    bad_row = good_doc()
    del bad_row["results"][2]["median_ms"]
    nan_row = good_doc()
    nan_row["results"][0]["tokens_per_s"] = float("nan")  # json.dumps writes NaN, which Python's json reads
    cases = {
        "missing": ([os.path.join(work, "missing.json")], "missing.json"),
        "directory": ([work], work),
        "csv": ([csv], "b.csv"),
        "empty": ([write("empty.json", "")], "empty.json"),
        "list": ([write("list.json", "[1, 2]")], "list.json"),
        "no_results": ([write("no_results.json", '{"machine": {}}')], "no_results.json"),
        "results_not_list": ([write("results_obj.json", '{"results": {"a": 1}}')], "results_obj.json"),
        "row_not_object": ([write("row_num.json", '{"results": [3]}')], "row_num.json"),
        "row_missing_field": ([write("bad_row.json", json.dumps(bad_row))], "bad_row.json"),
        "row_nan": ([write("nan_row.json", json.dumps(nan_row))], "nan_row.json"),
        "good_then_bad": ([good, csv], "b.csv"),
        "no_rows": ([write("no_rows.json", '{"results": []}')], "no_rows.json"),
    }
    with open(os.path.join(work, "binary.json"), "wb") as f:
        f.write(b"\xff\xfe\x00garbage")
    cases["binary"] = ([os.path.join(work, "binary.json")], "binary.json")
    for name, (inputs, named) in cases.items():
        expect_refused(args.plot, work, name, inputs, named)

    expect_plots(args.plot, work, "good", [good],
                 ["sequence_sweep_fw.png", "head_dim_sweep.png", "device_scaling_fw.png"])
    expect_failed_write_leaves_old(args.plot, work)

    if args.mlstm:  # a real bench's JSON (well under a second on CPU workers)
        real = os.path.join(work, "real.json")
        p = subprocess.run([args.mlstm, "bench", "--tokens", "1024", "--seq-lens", "256", "512", "--chunk-sizes", "64",
                            "--dqk", "16", "--dhv", "16", "--repeats", "1", "--head-dims", "16", "32",
                            "--graph-devices", "workers", "--json-out", real],
                           capture_output=True, text=True, timeout=120)
        check(p.returncode == 0, f"mlstm bench: exit {p.returncode}: {p.stderr[-2000:]}")
        if p.returncode == 0:
            expect_plots(args.plot, work, "real", [real],
                         ["sequence_sweep_fw.png", "head_dim_sweep.png", "device_scaling_fw.png"])

    if FAILURES:
        print(f"{len(FAILURES)} failure(s)", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print("plot.py: all input checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
