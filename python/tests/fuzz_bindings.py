"""A fuzzer of the mlstm_flow module (issue 21 item 6), of the same kind as tests/tools/test_cli_fuzz.cpp.

Random calls of forward, backward, step, kernels and devices with random combinations of arguments: valid
small arrays, wrong shapes, wrong dtypes (float16/float64/int/bool/object/complex, uint16 with and without
dtype='bfloat16'), non-contiguous and reversed-stride views, non-native byte order, empty and 0-d arrays,
NaN/inf, lists, strings and None where arrays are expected; huge, negative and zero chunk sizes and eps;
unknown kernels, gates, dtypes and device specs; unknown keyword arguments. forward and backward also draw
devices= (valid specs run through the flow graph; invalid ones, kernel= beside devices=, and the graph-only
keywords segment_tokens / balancing / return_info with bad values or without devices= must be refused), and
cu_seqlens= offsets, valid or not (int32, reversed, two-dimensional, one offset, big-endian, a string; packed states
are (N,...)). Every call must either return
results of the documented shapes and dtypes or raise ValueError/TypeError/RuntimeError; it must never crash
the interpreter or hang. The calls run in batches, each batch in a child process under a timeout, so a
segfault or a hang is reported with the seed, the batch and the call that did it.

Deterministic by default (fixed seed); MLSTM_TEST_SEED=random draws a fresh one, MLSTM_TEST_SEED=<n> replays
one; MLSTM_PY_FUZZ_COUNT sets the number of calls (default 400).
  python3 fuzz_bindings.py                    # the whole run (what ctest does)
  python3 fuzz_bindings.py --child SEED BATCH N   # one batch, printing each call before making it
"""
import os
import random
import subprocess
import sys
import tempfile
import time

FIXED_SEED = 20261202
BATCH = 100
BATCH_TIMEOUT_S = 120
ALLOWED = (ValueError, TypeError, RuntimeError)

# OpenCL kernels are drawn less often: each child process builds its programs once (about a second each on
# PoCL), which is most of the run time.
CPU_KERNELS = [
    "chunkwise--cpu_xl_chunk", "chunkwise--cpu_limit_chunk", "chunkwise--cpu_xl_chunk_siging", "parallel--cpu",
    "parallel--reference_f64", "sequence--cpu", "sequence--reference_f64",
]
# The share of kernel calls that go to OpenCL. Each such call with new dims, dtype, gate or chunk size compiles a
# program (PoCL: about a second, several on a loaded machine), so this share, not the count of calls, sets the
# run time; a few percent still reach every OpenCL argument path within the count.
OPENCL_SHARE = 0.03
OPENCL_KERNELS = ["chunkwise--opencl_xl_chunk", "chunkwise--opencl_tc_xl_chunk", "parallel--opencl", "sequence--opencl"]
KERNELS = CPU_KERNELS + OPENCL_KERNELS
STEP_KERNELS = ["cpu", "reference_f64", "opencl"]
# Flow-graph device specs. Those with OpenCL devices are drawn rarely (1 in 20): each new
# problem shape builds programs (seconds on PoCL, once per shape and program cache).
WORKER_SPECS = ["workers", "cpu-workers"]
OPENCL_SPECS = ["0", "1", "0,1", "all", "cpu", "workers+all", "workers+0"]
# Invalid or odd specs (empty parts and devices named twice are refused); each must give a result or
# ValueError/TypeError.
ODD_SPECS = ["", "gpu:7", "999", "-1", "0,0", "0,", ",0", "opencl:0", ",", "a,b", "+", "workers+", "+workers",
             "worker", "workers+workers", "all+all", "0+all", "99999999999999999999", "gpu:all", "cpu:9"]
BAD_NAMES = ["", "nope", "chunkwise--", "cpu\0x", "chunkwise--cpu_xl_chunk ", "x" * 300, "\u00e9\u00e8"]


def seed_from_env():
    s = os.environ.get("MLSTM_TEST_SEED", "")
    if s == "random":
        return random.SystemRandom().randrange(1, 2**31)
    if s.strip().lstrip("-").isdigit():
        return int(s)
    return FIXED_SEED


# ----------------------------------------------------------------------------------------------- child


class Call:
    """One generated call: the function, its arguments, and a one-line description for reports."""

    def __init__(self, fn, args, kwargs, desc):
        self.fn, self.args, self.kwargs, self.desc = fn, args, kwargs, desc


def describe(x):
    import numpy as np

    if isinstance(x, np.ndarray):
        flags = []
        if not x.flags.c_contiguous:
            flags.append("noncontig")
        if x.dtype.byteorder not in ("=", "|") and not x.dtype.isnative:
            flags.append("swapped")
        if x.size and x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            flags.append("nonfinite")
        return "array%s:%s%s" % (tuple(x.shape), x.dtype.str, ("[" + ",".join(flags) + "]") if flags else "")
    if isinstance(x, str) and len(x) > 20:
        return repr(x[:20] + "...")
    if isinstance(x, list):
        return "list(len %d)" % len(x)
    return repr(x)


def make_calls(seed, batch, count):
    import numpy as np

    rng = random.Random(seed * 1000003 + batch)
    nrng = np.random.default_rng(seed * 1000003 + batch)

    def arr(shape, dtype=np.float32):
        return nrng.standard_normal(shape).astype(dtype)

    def mutate(x, name):
        """x: a valid array for `name`; returns a bad or odd version of it."""
        kind = rng.choice([
            "shape_drop", "shape_add", "shape_change", "f16", "f64", "int", "bool", "object", "complex", "u16",
            "noncontig", "reversed", "swapped", "empty", "0d", "nan", "inf", "none", "list", "str", "scalar",
            "fortran", "readonly", "huge_values",
        ])
        if kind == "shape_drop" and x.ndim > 0:
            return x[..., 0] if x.shape[-1] > 0 else np.zeros(x.shape[:-1], x.dtype)
        if kind == "shape_add":
            return x[..., None]
        if kind == "shape_change" and x.ndim > 0:
            shape = list(x.shape)
            d = rng.randrange(len(shape))
            shape[d] = rng.choice([0, 1, shape[d] + 1, shape[d] + 3])
            return arr(tuple(shape), x.dtype if x.dtype.kind == "f" else np.float32)
        if kind == "f16":
            return x.astype(np.float16)
        if kind == "f64":
            return x.astype(np.float64)
        if kind == "int":
            return x.astype(rng.choice([np.int32, np.int64, np.int8]))
        if kind == "bool":
            return x > 0
        if kind == "object":
            return x.astype(object)
        if kind == "complex":
            return x.astype(np.complex64)
        if kind == "u16":
            return (nrng.integers(0, 2**16, size=x.shape)).astype(np.uint16)
        if kind == "noncontig" and x.ndim > 0:
            wide = np.repeat(x, 2, axis=-1)
            return wide[..., ::2]
        if kind == "reversed" and x.ndim > 0:
            return x[..., ::-1]
        if kind == "swapped":
            return x.astype(x.dtype.newbyteorder(">" if x.dtype.isnative and sys.byteorder == "little" else "<"))
        if kind == "empty":
            return np.zeros((0,) + x.shape[1:], x.dtype)
        if kind == "0d":
            return np.array(1.5, dtype=np.float32)
        if kind == "nan" and x.size and x.dtype.kind == "f":
            y = x.copy()
            y.flat[rng.randrange(y.size)] = np.nan
            return y
        if kind == "inf" and x.size and x.dtype.kind == "f":
            y = x.copy()
            y.flat[rng.randrange(y.size)] = rng.choice([np.inf, -np.inf])
            return y
        if kind == "none":
            return None
        if kind == "list":
            return x.tolist()
        if kind == "str":
            return "not an array"
        if kind == "scalar":
            return rng.choice([1, 2.5, True])
        if kind == "fortran":
            return np.asfortranarray(x)
        if kind == "readonly":
            y = x.copy()
            y.setflags(write=False)
            return y
        if kind == "huge_values" and x.dtype.kind == "f":
            return (x * 1e30).astype(x.dtype)
        return x

    def chunk_size():
        return rng.choice([64, 16, 1, 3, 0, -1, -(2**63), 2**31 - 1, 2**31, 2**62, 2**63 - 1, 2**64, 3.5, "8", None,
                           "auto", "Auto"])

    def eps():
        return rng.choice([1e-6, 1e-5, 0.0, -1e-6, float("nan"), float("inf"), -float("inf"), 1e300, 1e-320,
                           5e-324, "1e-6", None, 1])

    def name(valid):
        return rng.choice(valid) if rng.random() < 0.8 else rng.choice(BAD_NAMES + valid)

    def graph_spec():
        return rng.choice(WORKER_SPECS) if rng.random() < 0.95 else rng.choice(OPENCL_SPECS)

    def devices():
        r = rng.random()
        if r < 0.5:
            return graph_spec()
        return rng.choice(ODD_SPECS + [None, 0, b"workers", ["workers"]])

    def graph_options(kw):
        """devices= and the graph's keywords, valid or not; kernel= is mostly dropped (it is refused beside
        devices=)."""
        kw["devices"] = devices()
        if rng.random() < 0.7:
            kw.pop("kernel", None)
        if rng.random() < 0.3:
            kw["segment_tokens"] = rng.choice([None, 0, 1, 5, 16, 2**31, 2**63 - 1, 2**64, -1, 3.5, "8"])
        if rng.random() < 0.2:
            kw["balancing"] = rng.choice([None, "pull", "calibrated", "", "fast", 1])
        if rng.random() < 0.3:
            kw["return_info"] = rng.choice([True, False, None, 1, "yes"])

    def options(kw, has_chunk=True):
        if rng.random() < 0.3:
            kw["gate"] = rng.choice(["exp", "sig", "sigmoid", "", "foo", None])
        if rng.random() < 0.3:
            kw["normalize"] = rng.choice([True, False, None, 1, "yes"])
        if rng.random() < 0.3:
            kw["eps"] = eps()
        if has_chunk and rng.random() < 0.4:
            kw["chunk_size"] = chunk_size()
        if rng.random() < 0.25:
            kw["dtype"] = rng.choice(["", "bfloat16", "bf16", "float32", "float16", "x", None])
        if rng.random() < 0.05:
            kw[rng.choice(["chunksize", "bogus", "h0"])] = 1

    calls = []
    import mlstm_flow

    for _ in range(count):
        B, NH = rng.randint(1, 2), rng.randint(1, 3)
        S = rng.choice([1, 2, 5, 9, 17])
        DK, DV = rng.choice([1, 2, 4, 8]), rng.choice([1, 3, 4, 8])
        dt = rng.choice([np.float32, np.float32, np.float64, np.float16])
        bf16 = rng.random() < 0.1
        which = rng.choices(["forward", "backward", "step", "kernels", "devices", "resident"], [50, 25, 20, 3, 2, 4])[0]
        kw = {}
        if which in ("kernels", "devices"):
            args = [] if rng.random() < 0.9 else [1]
            if rng.random() < 0.1:
                kw["bogus"] = 1
            calls.append(Call(getattr(mlstm_flow, which), args, kw, "%s(%s)" % (which, ", ".join(map(describe, args)))))
            continue
        if which == "step":
            shapes = {"q": (B, NH, DK), "k": (B, NH, DK), "v": (B, NH, DV), "i": (B, NH), "f": (B, NH)}
            states = {"c": (B, NH, DK, DV), "n": (B, NH, DK), "m": (B, NH)}
        else:
            shapes = {"q": (B, NH, S, DK), "k": (B, NH, S, DK), "v": (B, NH, S, DV), "i": (B, NH, S), "f": (B, NH, S)}
            states = {"c0": (B, NH, DK, DV), "n0": (B, NH, DK), "m0": (B, NH)}
        vals = {}
        for n, sh in shapes.items():
            if bf16 and n in ("q", "k", "v"):
                vals[n] = (nrng.standard_normal(sh).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            else:
                vals[n] = arr(sh, dt if n in ("q", "k", "v") else np.float32)
        if bf16:
            kw["dtype"] = "bfloat16"
        if rng.random() < 0.5:
            for n, sh in states.items():
                vals[n] = np.zeros(sh, np.float32) if rng.random() < 0.5 else arr(sh)
        if which == "backward":
            vals["dh"] = arr((B, NH, S, DV), dt if not bf16 else np.float32)
            if rng.random() < 0.3:
                vals["dc_last"] = arr((B, NH, DK, DV))
                vals["dn_last"] = arr((B, NH, DK))
        # A third of the calls are valid; the others change one or two arguments (more would hide each other).
        clean = rng.random() < 0.35
        if not clean:
            for n in rng.sample(sorted(vals), k=min(len(vals), rng.choice([0, 1, 1, 1, 2]))):
                vals[n] = mutate(vals[n], n)
        positional = ["q", "k", "v", "i", "f"] + (["dh"] if which == "backward" else [])
        args = [vals.pop(n) for n in positional]
        if rng.random() < 0.05:
            args = args[: rng.randrange(len(args))]  # too few
        kw.update(vals)
        if which == "resident":  # Resident(...), run and read (resident() below): devices, split, weights
            kw["devices"] = rng.choice(["all", "all", "0", "0,1", "gpu", "bogus", "", 1, None])
            if rng.random() < 0.5:
                kw["split"] = rng.choice(["sequence", "heads", "rows", None])
            if rng.random() < 0.3:
                kw["weights"] = rng.choice([[1.0, 2.0], [1.0], [0.0, 0.0], [-1.0, 1.0], [float("nan"), 1.0], "x", None])
            if rng.random() < 0.5:
                kw["dh"] = arr((B, NH, S, DV), dt if not bf16 else np.float32)
            if rng.random() < 0.3:
                kw["chunk_size"] = chunk_size()
            kw = {k: v for k, v in kw.items() if v is not None or k == "devices"}
            desc = "Resident(%s%s)" % (", ".join(map(describe, args)),
                                       "".join(", %s=%s" % (k, describe(v)) for k, v in kw.items()))
            calls.append(Call(resident, args, kw, desc))
            continue
        if which == "step":
            kw["kernel"] = rng.choice(STEP_KERNELS[:2]) if rng.random() < 1 - OPENCL_SHARE else "opencl"
        else:
            kw["kernel"] = rng.choice(CPU_KERNELS) if rng.random() < 1 - OPENCL_SHARE else rng.choice(OPENCL_KERNELS)
        if clean:
            if rng.random() < 0.3:
                kw["chunk_size"] = rng.choice([1, 3, 16, 64, 2**31 - 1]) if which != "step" else None
                kw = {k: v for k, v in kw.items() if v is not None}
            if rng.random() < 0.3:
                kw["eps"] = rng.choice([1e-6, 1e-3, 1e-12])
            if which != "step" and rng.random() < 0.2:  # through the flow graph
                kw.pop("kernel")
                kw["devices"] = graph_spec()
                if rng.random() < 0.5:
                    kw["segment_tokens"] = rng.choice([0, 1, 2, 16, 2**31 - 1])
                if rng.random() < 0.1:
                    kw["balancing"] = "calibrated"
                if rng.random() < 0.5:
                    kw["return_info"] = True
            desc = "%s(%s%s)" % (which, ", ".join(map(describe, args)),
                                 "".join(", %s=%s" % (k, describe(v)) for k, v in kw.items()))
            calls.append(Call(getattr(mlstm_flow, which), args, kw, desc))
            continue
        if rng.random() < 0.2:
            kw["kernel"] = name(STEP_KERNELS if which == "step" else KERNELS)
        if rng.random() < 0.15:
            del kw["kernel"]
        options(kw, has_chunk=which != "step")
        if which == "forward" and rng.random() < 0.3:
            kw["return_last_states"] = rng.choice([True, False, None, 0])
        if which != "step" and rng.random() < 0.12:  # packed sequences: offsets valid or not
            cut = rng.randint(1, S - 1) if S > 1 else S
            good = np.array(sorted({0, cut, S}), dtype=np.int64)
            kw["cu_seqlens"] = rng.choice([good, good, good.astype(np.int32), good[::-1].copy(), good.reshape(1, -1),
                                           np.array([0], np.int64), [0, S], [1, S], good.astype(">i8"), "0,1", None])
        if which != "step":
            if rng.random() < 0.3:
                graph_options(kw)
            elif rng.random() < 0.05:  # a graph-only keyword without devices=
                kw[rng.choice(["segment_tokens", "balancing", "return_info"])] = rng.choice([16, "pull", True])
        desc = "%s(%s%s)" % (which, ", ".join(map(describe, args)),
                             "".join(", %s=%s" % (k, describe(v)) for k, v in kw.items()))
        calls.append(Call(getattr(mlstm_flow, which), args, kw, desc))
    return calls


def resident(*args, **kw):
    """mlstm_flow.Resident(...) made, run (forward, and backward with dh) and read; the forward's dict."""
    import mlstm_flow

    r = mlstm_flow.Resident(*args, **kw)
    r.forward()
    if kw.get("dh") is not None:
        r.backward()
        r.read_backward()
    return r.read_forward()


def check_result(call, out):
    """Raises AssertionError when a successful call returned something other than what is documented."""
    import numpy as np

    name = call.fn.__name__
    if name in ("kernels", "devices"):
        assert isinstance(out, list), type(out)
        return
    if name == "resident":
        q, v = np.asarray(call.args[0]), np.asarray(call.args[2])
        assert isinstance(out, dict) and sorted(out) == ["c", "h", "m", "n"], out
        assert out["h"].shape == q.shape[:3] + v.shape[3:], (out["h"].shape, q.shape, v.shape)
        return
    q, v = call.args[0], call.args[2]
    bf16 = call.kwargs.get("dtype") in ("bfloat16", "bf16")
    want_h_dtype = np.dtype(np.uint16) if bf16 else np.dtype(np.asarray(q).dtype.newbyteorder("="))

    def is_arr(x, shape, dtype=None):
        assert isinstance(x, np.ndarray), "expected an ndarray, got %r" % type(x)
        assert x.shape == tuple(shape), "shape %s, expected %s" % (x.shape, tuple(shape))
        if dtype is not None:
            assert x.dtype == dtype, "dtype %s, expected %s" % (x.dtype, dtype)
        else:
            assert x.dtype.kind == "f", "dtype %s, expected a float dtype" % x.dtype

    if call.kwargs.get("return_info") is True:  # (result, info) from a flow-graph run
        out, info = out
        assert isinstance(info, dict) and isinstance(info["devices"], list) and info["devices"], info
        assert set(info["ran"]) <= set(info["devices"]), info
    qs, vs = np.shape(q), np.shape(v)
    if name == "forward":
        if call.kwargs.get("return_last_states", True):
            h, (c, n, m) = out
        else:
            h, c = out, None
        is_arr(h, qs[:3] + vs[3:], want_h_dtype)
        if c is not None:
            B, NH, DK, DV = qs[0], qs[1], qs[3], vs[3]
            if call.kwargs.get("cu_seqlens") is not None:  # packed: one state per sequence
                B = len(np.asarray(call.kwargs["cu_seqlens"])) - 1
            is_arr(c, (B, NH, DK, DV))
            is_arr(n, (B, NH, DK))
            is_arr(m, (B, NH))
    elif name == "step":
        h, (c, n, m) = out
        is_arr(h, qs[:2] + vs[2:], want_h_dtype)
        B, NH, DK, DV = qs[0], qs[1], qs[2], vs[2]
        is_arr(c, (B, NH, DK, DV))
        is_arr(n, (B, NH, DK))
        is_arr(m, (B, NH))
    elif name == "backward":
        assert isinstance(out, dict), type(out)
        for key, arg in (("dq", 0), ("dk", 1), ("dv", 2)):  # in q's dtype (uint16 for bfloat16)
            is_arr(out[key], np.shape(call.args[arg]), want_h_dtype)
        for key, arg in (("di", 3), ("df", 4)):  # in the gates' dtype (uint16 gates are bfloat16 with dtype='bfloat16')
            gate_u16 = bf16 and np.asarray(call.args[3]).dtype == np.uint16
            is_arr(out[key], np.shape(call.args[arg]), np.dtype(np.uint16) if gate_u16 else None)
        if "c0" in call.kwargs and call.kwargs["c0"] is not None:
            assert {"dc0", "dn0", "dm0"} <= set(out), sorted(out)


def child(seed, batch, count):
    calls = make_calls(seed, batch, count)
    for idx, call in enumerate(calls):
        print("CALL %d.%d %s" % (batch, idx, call.desc), flush=True)
        try:
            out = call.fn(*call.args, **call.kwargs)
        except ALLOWED as e:
            # Messages are one line and name the argument, a call with a required argument missing or too many
            # positional ones too (issue 21 item 5: pybind11's "incompatible function arguments" took several).
            if isinstance(e, (ValueError, TypeError)) and (not str(e) or "\n" in str(e)):
                print("FAIL a %s message that is not one line: %r" % (type(e).__name__, str(e)), flush=True)
                return 1
            msg = str(e).splitlines()[0] if str(e) else ""
            print("  -> %s: %s" % (type(e).__name__, msg[:200]), flush=True)
            continue
        except BaseException as e:  # anything else is a finding
            print("FAIL unexpected %s: %s" % (type(e).__name__, e), flush=True)
            return 1
        try:
            check_result(call, out)
        except Exception as e:
            print("FAIL result not as documented: %s: %s" % (type(e).__name__, e), flush=True)
            return 1
        print("  -> ok", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- parent


def main():
    seed = seed_from_env()
    count = int(os.environ.get("MLSTM_PY_FUZZ_COUNT", "400"))
    replay = "MLSTM_TEST_SEED=%d MLSTM_PY_FUZZ_COUNT=%d" % (seed, count)
    print("[ seed ] %d (replay: %s python3 %s)" % (seed, replay, sys.argv[0]), flush=True)
    start = time.monotonic()
    # balancing='calibrated' caches its measurements under $XDG_CACHE_HOME: a directory of this run, not the user's.
    cache = tempfile.TemporaryDirectory(prefix="mlstm-pyfuzz-")
    env = dict(os.environ, XDG_CACHE_HOME=cache.name)
    failures = 0
    stats = {"ok": 0, "raised": 0}
    for batch in range((count + BATCH - 1) // BATCH):
        n = min(BATCH, count - batch * BATCH)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(seed), str(batch), str(n)]
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BATCH_TIMEOUT_S,
                               text=True, errors="replace", env=env)
            out, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = "timeout after %d s (hang)" % BATCH_TIMEOUT_S
        lines = out.splitlines()
        stats["ok"] += sum(1 for l in lines if l == "  -> ok")
        stats["raised"] += sum(1 for l in lines if l.startswith("  -> ") and l != "  -> ok")
        if rc != 0:
            failures += 1
            last = [l for l in lines if l.startswith("CALL ")]
            fails = [l for l in lines if l.startswith("FAIL")]
            how = ("killed by signal %d" % -rc) if isinstance(rc, int) and rc < 0 else (
                "exit %s" % rc if isinstance(rc, int) else rc)
            print("FAILED batch %d (%s), seed %d: %s" % (batch, how, seed, fails[-1] if fails else ""))
            print("  the call: %s" % (last[-1] if last else "<before the first call>"))
            print("  replay:   %s python3 %s --child %d %d %d" % (replay, sys.argv[0], seed, batch, n))
            tail = "\n".join(lines[-6:])
            print("  output tail:\n%s" % tail)
    took = time.monotonic() - start
    print("%d calls in %.1f s: %d returned, %d raised ValueError/TypeError/RuntimeError; %d failing batches"
          % (count, took, stats["ok"], stats["raised"], failures))
    cache.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.exit(child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    sys.exit(main())
