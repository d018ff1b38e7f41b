"""The mlstm_flow Python module against a numpy float64 recurrent reference (written here)."""
import os
import pathlib
import subprocess
import sys
import tempfile
import threading

import numpy as np

import mlstm_flow


def logsigmoid(x):
    return np.where(x >= 0, -np.log1p(np.exp(-x)), x - np.log1p(np.exp(x)))


def reference(q, k, v, i, f, c0=None, n0=None, m0=None, eps=1e-6):
    q, k, v, i, f = (x.astype(np.float64) for x in (q, k, v, i, f))
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    C = np.zeros((B, NH, DK, DV)) if c0 is None else c0.astype(np.float64).copy()
    n = np.zeros((B, NH, DK)) if n0 is None else n0.astype(np.float64).copy()
    m = np.zeros((B, NH)) if m0 is None else m0.astype(np.float64).copy()
    h = np.zeros((B, NH, S, DV))
    for t in range(S):
        lf = logsigmoid(f[:, :, t])
        m_new = np.maximum(lf + m, i[:, :, t])
        a = np.exp(lf + m - m_new)
        b = np.exp(i[:, :, t] - m_new)
        C = a[..., None, None] * C + b[..., None, None] * k[:, :, t, :, None] * v[:, :, t, None, :]
        n = a[..., None] * n + b[..., None] * k[:, :, t]
        m = m_new
        qs = q[:, :, t] / np.sqrt(DK)
        num = np.einsum("bhd,bhde->bhe", qs, C)
        den = np.einsum("bhd,bhd->bh", qs, n)
        h[:, :, t] = num / (np.maximum(np.abs(den), np.exp(-m)) + eps)[..., None]
    return h, (C, n, m)


def rel(a, b):
    return np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b))


def rel0(a, b):
    """rel, or the absolute difference where b is all zeros (m of the sigmoid gate, which has no stabiliser)."""
    scale = np.max(np.abs(b))
    diff = np.max(np.abs(a.astype(np.float64) - b))
    return diff / scale if scale > 0 else diff


def seed_from_env():
    """The same inputs every run (CI), like the C++ suite: MLSTM_TEST_SEED=<n> picks another seed, =random a fresh one."""
    value = os.environ.get("MLSTM_TEST_SEED", "")
    if value == "random":
        return int(np.random.SeedSequence().entropy) % 2**63
    return int(value) if value else 20261202


def float32_inputs(rng, B, NH, S, DK, DV):
    """q, k, v, i, f (forget gates around 3) and dh, float32 normal draws."""
    q = rng.standard_normal((B, NH, S, DK), dtype=np.float32)
    k = rng.standard_normal((B, NH, S, DK), dtype=np.float32)
    v = rng.standard_normal((B, NH, S, DV), dtype=np.float32)
    i = rng.standard_normal((B, NH, S), dtype=np.float32)
    f = (3 + rng.standard_normal((B, NH, S))).astype(np.float32)
    dh = rng.standard_normal((B, NH, S, DV)).astype(np.float32)
    return q, k, v, i, f, dh


def check_resident(rng):
    """Issue 15: Resident keeps one problem on several OpenCL devices (the sequence split, summaries exchanged, and the
    head split); forward and backward equal one kernel call, repeatable; bad arguments are refused naming them."""
    B, NH, S, DK, DV, L = 1, 2, 150, 16, 16, 32  # S is not a multiple of L: the last part is ragged
    q, k, v, i, f, dh = float32_inputs(rng, B, NH, S, DK, DV)
    c0 = 0.5 * rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    n0 = 0.5 * rng.standard_normal((B, NH, DK)).astype(np.float32)
    m0 = rng.standard_normal((B, NH)).astype(np.float32)
    one = "chunkwise--cpu_xl_chunk"
    h1, s1 = mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, kernel=one, chunk_size=L)
    g1 = mlstm_flow.backward(q, k, v, i, f, dh, c0, n0, m0, kernel=one, chunk_size=L)
    for split, weights in (("sequence", None), ("sequence", [2.0, 1.0]), ("heads", None)):
        r = mlstm_flow.Resident(q, k, v, i, f, devices="all", dh=dh, c0=c0, n0=n0, m0=m0, chunk_size=L, split=split,
                                weights=weights)
        assert len(r.parts) == 2 and [p["device"] for p in r.parts] == [0, 1], r.parts
        for _ in range(2):
            r.forward()
            r.backward()
        fw, g = r.read_forward(), r.read_backward()
        assert rel0(fw["h"], h1) < 1e-4, (split, rel0(fw["h"], h1))
        for name, ref in zip("cnm", s1):
            assert rel0(fw[name], ref) < 1e-4, (split, name)
        assert sorted(g) == sorted(g1), sorted(g)
        for name in g1:
            assert rel0(g[name], g1[name]) < 1e-3, (split, name, rel0(g[name], g1[name]))
        assert r.lost == []
    for kw, arg in ((dict(split="rows"), "split"), (dict(weights=[1.0]), "weights"), (dict(devices="bogus"), "devices"),
                    (dict(dc_last=c0), "dc_last")):
        try:
            mlstm_flow.Resident(q, k, v, i, f, **{"devices": "all", **kw})
        except ValueError as err:
            assert str(err).startswith(arg + ":"), str(err)
        else:
            raise AssertionError("no ValueError for %s" % kw)
    print("resident: the sequence and head splits over two devices equal one kernel call")


def check_graph(rng):
    """Issue 14 item 1: forward/backward(devices=...) run through the flow graph on every device the spec names and
    equal one kernel call; the devices that took part are reported (return_info=True); bad specs are refused."""
    B, NH, S, DK, DV, L = 1, 2, 77, 16, 8, 16  # S is not a multiple of the chunk size L
    q, k, v, i, f, dh = float32_inputs(rng, B, NH, S, DK, DV)
    state = dict(c0=0.5 * rng.standard_normal((B, NH, DK, DV)).astype(np.float32),
                 n0=0.5 * rng.standard_normal((B, NH, DK)).astype(np.float32),
                 m0=rng.standard_normal((B, NH)).astype(np.float32))
    one_kernel = "chunkwise--cpu_xl_chunk"

    # Every spec against one kernel call: with and without an initial state, both gates. segment_tokens=32 makes
    # the one worker run three segments (one device alone would get one segment: the kernel call itself).
    infos = {}
    for spec, segment_tokens in [("workers", 32), ("all", None), ("workers+all", None), ("workers+all", 16)]:
        for init in (dict(), state):
            for gate in ("exp", "sig"):
                kw = dict(chunk_size=L, gate=gate, **init)
                if init and gate == "sig":
                    kw["m0"] = np.zeros_like(init["m0"])  # the sigmoid gate has no stabiliser state
                h1, s1 = mlstm_flow.forward(q, k, v, i, f, kernel=one_kernel, **kw)
                (h, s), info = mlstm_flow.forward(q, k, v, i, f, devices=spec, segment_tokens=segment_tokens,
                                                  return_info=True, **kw)
                what = "forward devices=%r segment_tokens=%r gate=%s %s" % (spec, segment_tokens, gate,
                                                                           "state" if init else "no state")
                assert h.dtype == h1.dtype and h.shape == h1.shape, what
                assert rel0(h, h1) < 1e-4, (what, rel0(h, h1))
                for name, a, b in zip("cnm", s, s1):
                    assert rel0(a, b) < 1e-4, (what, name, rel0(a, b))
                assert info["segments"] > 1, (what, info)
                g1 = mlstm_flow.backward(q, k, v, i, f, dh, kernel=one_kernel, **kw)
                g, binfo = mlstm_flow.backward(q, k, v, i, f, dh, devices=spec, segment_tokens=segment_tokens,
                                               return_info=True, **kw)
                assert sorted(g) == sorted(g1), (what, sorted(g))
                for name in g1:
                    assert rel0(g[name], g1[name]) < 1e-3, ("backward", what, name, rel0(g[name], g1[name]))
                assert binfo["devices"] == info["devices"], (what, binfo, info)
                infos[spec] = info
    print("graph: forward and backward through workers, all, workers+all equal one kernel call")

    # The multi-device spec is honoured: every device it names is in the graph, in the spec's order, none cut.
    opencl = mlstm_flow.devices()
    assert len(opencl) >= 2, "needs two OpenCL devices (POCL_DEVICES='pthread pthread', as ctest sets): %s" % opencl
    workers, every = infos["workers"]["devices"], infos["all"]["devices"]
    assert len(workers) >= 1 and all(d.startswith("cpu:") for d in workers), workers
    assert len(every) == len(opencl) and all(d.startswith("opencl:") for d in every), (every, opencl)
    assert infos["workers+all"]["devices"] == workers + every, infos["workers+all"]
    _, info01 = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, devices="0,1", return_info=True)
    assert info01["devices"] == every[:2], info01
    for info in infos.values():
        assert info["left_out"] == [] and info["balancing"] == "pull", info
        assert info["ran"] and set(info["ran"]) <= set(info["devices"]), info
        assert any(line.startswith("segment ") for line in info["log"]), info
    print("graph: workers+all ran on %d devices: %s" % (len(infos["workers+all"]["devices"]),
                                                        infos["workers+all"]["devices"]))

    # chunk_size left out ("auto", the default): the size the devices choose, reported in info["chunk_size"]; the
    # run equals the run that names it, bit for bit (CPU workers alone), and one kernel's default too.
    h_auto, info_auto = mlstm_flow.forward(q, k, v, i, f, devices="workers", return_info=True)
    assert info_auto["chunk_size"] >= 1, info_auto
    h_named, info_named = mlstm_flow.forward(q, k, v, i, f, devices="workers", chunk_size=info_auto["chunk_size"],
                                             return_info=True)
    assert info_named["chunk_size"] == info_auto["chunk_size"]
    assert np.array_equal(h_auto[0], h_named[0]), "an automatic chunk size differs from the size it chose"
    h_kernel = mlstm_flow.forward(q, k, v, i, f, chunk_size="auto")[0]
    assert np.array_equal(h_kernel, mlstm_flow.forward(q, k, v, i, f)[0])
    print("chunk_size='auto': the workers chose %d" % info_auto["chunk_size"])
    # A chunk longer than the sequence: the run takes chunks (and segments) of the S tokens there are, as reported.
    h_long, info_long = mlstm_flow.forward(q, k, v, i, f, devices="workers", chunk_size=100000, return_info=True)
    assert info_long["chunk_size"] == S and info_long["segment_tokens"] <= S, info_long
    assert rel(h_long[0], h_kernel) < 1e-5

    # return_last_states=False: (h, info); bfloat16 inputs; calibrated balancing (its cache in a temporary dir).
    h1 = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, return_last_states=False)
    h, info = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, return_last_states=False, devices="workers+all",
                                 return_info=True)
    assert isinstance(h, np.ndarray) and rel0(h, h1) < 1e-4 and len(info["devices"]) > 1
    to_bf16 = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)
    from_bf16 = lambda x: (x.astype(np.uint32) << 16).view(np.float32)
    hb1, _ = mlstm_flow.forward(to_bf16(q), to_bf16(k), to_bf16(v), i, f, chunk_size=L, dtype="bfloat16")
    hb, _ = mlstm_flow.forward(to_bf16(q), to_bf16(k), to_bf16(v), i, f, chunk_size=L, dtype="bfloat16",
                               devices="workers+all")
    assert hb.dtype == np.uint16 and rel0(from_bf16(hb), from_bf16(hb1).astype(np.float64)) < 2e-2
    with tempfile.TemporaryDirectory() as cache:
        saved = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = cache
        try:
            (h, _), info = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, devices="workers+all",
                                              balancing="calibrated", return_info=True)
            # fastest: one device alone or all, whichever measured faster (the rates in info["measured"]).
            (hf, _), finfo = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, devices="workers+all",
                                                balancing="fastest", return_info=True)
            assert finfo["balancing"] == "fastest" and rel0(hf, h1) < 1e-4, finfo
            assert len(finfo["measured"]) == 4 and finfo["devices"], finfo  # 3 devices alone + the graph
        finally:
            if saved is None:
                del os.environ["XDG_CACHE_HOME"]
            else:
                os.environ["XDG_CACHE_HOME"] = saved
    assert info["balancing"] == "calibrated" and rel0(h, h1) < 1e-4, info

    # Refusals name the argument: bad specs (the library's message), kernel= with devices= (the graph picks each
    # device's kernel), graph-only keywords without devices=, wrong types.
    for bad, arg, exc in [(dict(devices="gpu:7"), "devices", ValueError), (dict(devices=""), "devices", ValueError),
                          (dict(devices="workers+"), "devices", ValueError), (dict(devices="a,b"), "devices", ValueError),
                          (dict(devices="99"), "devices", ValueError),
                          (dict(devices="99999999999999999999"), "devices", ValueError), (dict(devices=["all"]), "devices", TypeError),
                          (dict(devices="all", kernel=one_kernel), "kernel", ValueError),
                          (dict(devices="workers", kernel="chunkwise--opencl_xl_chunk"), "kernel", ValueError),
                          (dict(devices="0", kernel="chunkwise--opencl_xl_chunk", return_info=True), "return_info",
                           ValueError),
                          (dict(segment_tokens=32), "segment_tokens", ValueError),
                          (dict(balancing="pull"), "balancing", ValueError),
                          (dict(return_info=True), "return_info", ValueError),
                          (dict(devices="workers", segment_tokens=-1), "segment_tokens", ValueError),
                          (dict(devices="workers", segment_tokens="32"), "segment_tokens", TypeError),
                          (dict(devices="workers", balancing="fast"), "balancing", ValueError),
                          (dict(devices="workers", balancing=1), "balancing", TypeError),
                          (dict(devices="workers", return_info=1), "return_info", TypeError),
                          (dict(devices="workers", gate="exp", normalize=False), "normalize", ValueError)]:
        for fn, args in [(mlstm_flow.forward, (q, k, v, i, f)), (mlstm_flow.backward, (q, k, v, i, f, dh))]:
            try:
                fn(*args, chunk_size=L, **bad)
            except exc as err:
                assert str(err).startswith(arg + ":"), (fn.__name__, bad, str(err))
            else:
                raise AssertionError("no %s for %s in %s(%s)" % (exc.__name__, arg, fn.__name__, bad))
    # An OpenCL kernel with a spec naming one device runs on that device, as `mlstm forward --kernel K --devices 1`.
    h_dev1 = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, kernel="chunkwise--opencl_xl_chunk", devices="1",
                                return_last_states=False)
    assert rel0(h_dev1, h) < 1e-4
    # A segment longer than the sequence is the sequence: one segment.
    _, info = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, devices="workers", segment_tokens=2**63 - 1,
                                 return_info=True)
    assert info["segments"] == 1, info


def check_packed(rng):
    """Issue 19: cu_seqlens= packs N sequences into one row; each sequence's h, last state and gradients equal the
    sequence run alone, through one kernel and through the graph (devices=); bad offsets are refused by name."""
    lengths = [1, 15, 16, 17, 40, 3]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    N, NH, S, DK, DV = len(lengths), 2, int(offsets[-1]), 16, 8
    q = rng.standard_normal((1, NH, S, DK), dtype=np.float32)
    k = rng.standard_normal((1, NH, S, DK), dtype=np.float32)
    v = rng.standard_normal((1, NH, S, DV), dtype=np.float32)
    i = rng.standard_normal((1, NH, S), dtype=np.float32)
    f = (3 + rng.standard_normal((1, NH, S))).astype(np.float32)
    c0 = 0.5 * rng.standard_normal((N, NH, DK, DV)).astype(np.float32)
    n0 = 0.5 * rng.standard_normal((N, NH, DK)).astype(np.float32)
    m0 = rng.standard_normal((N, NH)).astype(np.float32)
    dh = rng.standard_normal((1, NH, S, DV)).astype(np.float32)
    for devices in (None, "workers"):
        h, (c, n, m) = mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, chunk_size=16, cu_seqlens=offsets,
                                          devices=devices)
        assert h.shape == (1, NH, S, DV) and c.shape == (N, NH, DK, DV) and m.shape == (N, NH)
        g = mlstm_flow.backward(q, k, v, i, f, dh, c0, n0, m0, chunk_size=16, cu_seqlens=offsets, devices=devices)
        assert g["dc0"].shape == (N, NH, DK, DV) and g["dq"].shape == q.shape
        for j in range(N):
            t0, t1 = offsets[j], offsets[j + 1]
            cut = lambda x: np.ascontiguousarray(x[:, :, t0:t1])
            sl = lambda x: np.ascontiguousarray(x[j:j + 1])
            h_ref, (c_ref, _, m_ref) = reference(cut(q), cut(k), cut(v), cut(i), cut(f), sl(c0), sl(n0), sl(m0))
            assert rel0(h[:, :, t0:t1], h_ref) < 1e-4, (devices, j, rel0(h[:, :, t0:t1], h_ref))
            assert rel0(c[j:j + 1], c_ref) < 1e-4 and rel0(m[j:j + 1], m_ref) < 1e-5
            alone = mlstm_flow.backward(cut(q), cut(k), cut(v), cut(i), cut(f), cut(dh), sl(c0), sl(n0), sl(m0),
                                        chunk_size=16)
            for name in ("dq", "dk", "dv", "di", "df"):
                assert rel0(g[name][:, :, t0:t1], alone[name]) < 1e-5, (devices, j, name)
            assert rel0(g["dc0"][j:j + 1], alone["dc0"]) < 1e-5
    # Probe 42: return_info tells the packed plan: whole-sequence segments up to segment_tokens, and with several
    # devices the sequences cut across all of them (the 40 tokens here, more than two segments of 16).
    for devices, spread in (("workers", []), ("0,1", [4])):
        _, info = mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, chunk_size=16, cu_seqlens=offsets, devices=devices,
                                     segment_tokens=16, return_info=True)
        assert info["packed_sequences"] == N and info["spread_sequences"] == spread, (devices, info)
        assert info["segments"] >= 1 and info["segment_tokens"] == 16, (devices, info)
    # The same sequences streamed through a Session in pieces of 10 tokens (cut at the boundaries, a new sequence
    # started with start_sequence()), each sequence's last state taken after its last piece: equal to the packed call.
    for devices in (None, "workers"):
        h_packed, (c_packed, _, m_packed) = mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, chunk_size=16,
                                                               cu_seqlens=offsets)
        s = mlstm_flow.Session(NH, DK, DV, devices=devices, chunk_size=16)
        parts, t = [], 0
        while t < S:
            j = int(np.searchsorted(offsets, t, side="right")) - 1
            end = min(S, int(offsets[j + 1]), (t // 10 + 1) * 10)
            if t == offsets[j]:
                s.start_sequence(c0[j:j + 1], n0[j:j + 1], m0[j:j + 1])
            parts.append(s.push(*(x[:, :, t:end] for x in (q, k, v, i, f))))
            if end == offsets[j + 1]:
                c_j, _, m_j = s.state()
                assert rel0(c_j, c_packed[j:j + 1]) < 1e-4 and rel0(m_j, m_packed[j:j + 1]) < 1e-5, (devices, j)
            t = end
        assert rel0(np.concatenate(parts, axis=2), h_packed) < 1e-4, devices
        # Again with every piece submitted ahead and each sequence's last piece keeping its state (take_state after
        # its h), without a wait per sequence: the same h and last states.
        s = mlstm_flow.Session(NH, DK, DV, devices=devices, chunk_size=16)
        tickets, t = [], 0
        while t < S:
            j = int(np.searchsorted(offsets, t, side="right")) - 1
            end = min(S, int(offsets[j + 1]), (t // 10 + 1) * 10)
            if t == offsets[j]:
                s.start_sequence(c0[j:j + 1], n0[j:j + 1], m0[j:j + 1])
            last = end == offsets[j + 1]
            tickets.append((s.submit(*(x[:, :, t:end] for x in (q, k, v, i, f)), keep_state=last), j if last else -1))
            t = end
        kept_parts = []
        for ticket, j in tickets:
            if j >= 0:
                try:
                    s.take_state(ticket)
                except ValueError as err:
                    assert str(err).startswith("ticket:"), str(err)
                else:
                    raise AssertionError("take_state before take")
            kept_parts.append(s.take(ticket))
            if j >= 0:
                c_j, _, m_j = s.take_state(ticket)
                assert rel0(c_j, c_packed[j:j + 1]) < 1e-4 and rel0(m_j, m_packed[j:j + 1]) < 1e-5, (devices, j)
        assert np.array_equal(np.concatenate(kept_parts, axis=2), np.concatenate(parts, axis=2)), devices
        try:
            s.take_state(tickets[-1][0])
        except ValueError as err:
            assert str(err).startswith("ticket:"), str(err)
        else:
            raise AssertionError("take_state twice")
        # Sequences 1.. in one packed call beside the stream (forward_sequences), after sequence 0 streamed: the same
        # h and last states; the next piece must start a sequence.
        s = mlstm_flow.Session(NH, DK, DV, devices=devices, chunk_size=16)
        o1 = int(offsets[1])
        s.start_sequence(c0[:1], n0[:1], m0[:1])
        h0 = s.push(*(x[:, :, :o1] for x in (q, k, v, i, f)))
        rest = (offsets[1:] - o1).astype(np.int64)
        h_rest, (c_rest, _, m_rest) = s.forward_sequences(*(x[:, :, o1:] for x in (q, k, v, i, f)), rest, c0[1:],
                                                           n0[1:], m0[1:])
        assert rel0(np.concatenate([h0, h_rest], axis=2), h_packed) < 1e-4, devices
        assert rel0(c_rest, c_packed[1:]) < 1e-4 and rel0(m_rest, m_packed[1:]) < 1e-5, devices
        assert s.tokens == S
        try:
            s.push(*(x[:, :, :1] for x in (q, k, v, i, f)))
        except ValueError as err:
            assert str(err).startswith("cu_seqlens:"), str(err)
        else:
            raise AssertionError("a piece after forward_sequences without start_sequence")
        s.start_sequence()  # the zero state
        assert not s.state()[0].any()
        try:
            s.start_sequence(c0[:1], n0[:1])
        except ValueError as err:
            assert str(err).startswith("c0:"), str(err)
        else:
            raise AssertionError("start_sequence took c0 without m0")
    for bad, says in [(offsets.astype(np.int32), "int64"), (offsets[::-1].copy(), "start at 0"),
                      (offsets[:-1].copy(), "end at S"), (np.array([0, 5, 5, S], dtype=np.int64), "increase strictly"),
                      (offsets.reshape(1, -1), "one-dimensional"), (np.array([0], dtype=np.int64), "N + 1 >= 2"),
                      (offsets.astype(">i8"), "byte order")]:
        try:
            mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, cu_seqlens=bad)
        except ValueError as err:
            assert str(err).startswith("cu_seqlens:") and says in str(err), str(err)
        else:
            raise AssertionError("no ValueError for cu_seqlens " + says)
    try:  # per-sequence states are (N, ...): one row's (1, ...) is refused naming c0
        mlstm_flow.forward(q, k, v, i, f, c0[:1], n0[:1], m0[:1], cu_seqlens=offsets)
    except ValueError as err:
        assert str(err).startswith("c0:"), str(err)
    else:
        raise AssertionError("no ValueError for c0 of one row with six sequences")


def check_streaming_and_memory(rng):
    """Issue 14 items 2 and 6: a Session streams one sequence in pieces (push, submit/take in any order, the stream()
    iterator, the state, snapshot/restore) equal to one forward; forward(out=) writes h in place; host_array() gives
    arrays in the devices' fastest memory that forward reads and writes directly; forward(keep=) keeps states that
    backward(checkpoints=) starts from."""
    B, NH, S, DK, DV, L = 1, 2, 150, 16, 8, 16
    q = rng.standard_normal((B, NH, S, DK), dtype=np.float32)
    k = rng.standard_normal((B, NH, S, DK), dtype=np.float32)
    v = rng.standard_normal((B, NH, S, DV), dtype=np.float32)
    i = rng.standard_normal((B, NH, S), dtype=np.float32)
    f = (3 + rng.standard_normal((B, NH, S))).astype(np.float32)
    h_ref, (c_ref, n_ref, m_ref) = reference(q, k, v, i, f)
    cuts = [0, 1, 17, 64, 100, 150]  # pieces of 1, 16, 47, 36 and 50 tokens
    pieces = [tuple(x[:, :, a:b] for x in (q, k, v, i, f)) for a, b in zip(cuts, cuts[1:])]
    for devices in [None, "workers"] + (["0"] if mlstm_flow.devices() else []):
        what = "Session devices=%r" % (devices,)
        s = mlstm_flow.Session(NH, DK, DV, B=B, devices=devices, chunk_size=L)
        h = np.concatenate([s.push(*p) for p in pieces], axis=2)
        assert rel0(h, h_ref) < 2e-4, (what, rel0(h, h_ref))
        c, n, m = s.state()
        assert rel0(c, c_ref) < 2e-4 and rel0(m, m_ref) < 1e-5, what
        assert s.tokens == S
        s2 = mlstm_flow.Session(NH, DK, DV, B=B, devices=devices, chunk_size=L)
        tickets = [s2.submit(*p) for p in pieces]
        hs = {t: s2.take(t) for t in reversed(tickets)}  # any order
        assert np.array_equal(np.concatenate([hs[t] for t in tickets], axis=2), h), what
        s3 = mlstm_flow.Session(NH, DK, DV, B=B, devices=devices, chunk_size=L)
        assert np.array_equal(np.concatenate(list(s3.stream(iter(pieces), in_flight=2)), axis=2), h), what
    # snapshot / restore: the second half continues from the first half's state, bit for bit
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.mlstm")
        s = mlstm_flow.Session(NH, DK, DV, chunk_size=L)
        first = [s.push(*p) for p in pieces[:3]]
        s.snapshot(path)
        rest = [s.push(*p) for p in pieces[3:]]
        r = mlstm_flow.Session.restore(path, NH, DK, DV, chunk_size=L)
        assert r.tokens == cuts[3]
        assert all(np.array_equal(r.push(*p), x) for p, x in zip(pieces[3:], rest))
        try:
            mlstm_flow.Session.restore(path, NH, DK, DV, chunk_size=2 * L)
        except ValueError as err:
            assert "chunk" in str(err), str(err)
        else:
            raise AssertionError("a snapshot of another chunk size was taken")
        # Probe 42: a path that cannot hold a snapshot, and a file that is none, are ValueErrors naming path.
        junk = os.path.join(tmp, "junk.mlstm")
        with open(junk, "w") as out:
            out.write("junk")
        for bad in (tmp, os.path.join(tmp, "missing", "x.mlstm"), ""):
            expect_error(ValueError, "path", s.snapshot, bad)
        for bad in (os.path.join(tmp, "missing.mlstm"), tmp, junk):
            expect_error(ValueError, "path", mlstm_flow.Session.restore, bad, NH, DK, DV, chunk_size=L)
    # an initial state, bfloat16 pieces, refusals naming the argument
    c0 = 0.5 * rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    n0 = 0.5 * rng.standard_normal((B, NH, DK)).astype(np.float32)
    m0 = rng.standard_normal((B, NH)).astype(np.float32)
    s = mlstm_flow.Session(NH, DK, DV, chunk_size=L, c0=c0, n0=n0, m0=m0)
    h0 = np.concatenate([s.push(*p) for p in pieces], axis=2)
    assert rel0(h0, reference(q, k, v, i, f, c0, n0, m0)[0]) < 2e-4
    bf = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any bfloat16 pattern will do
    sb = mlstm_flow.Session(NH, DK, DV, chunk_size=L, dtype="bfloat16")
    hb = sb.push(bf(q), bf(k), bf(v), i, f)
    assert hb.dtype == np.uint16 and hb.shape == (B, NH, S, DV)
    for kwargs, arg in [(dict(NH=0), "NH"), (dict(kernel="nope"), "kernel"), (dict(dtype="float32"), "dtype"),
                        (dict(balancing="pull"), "balancing"), (dict(c0=c0), "c0")]:
        kw = dict(NH=NH, DHQK=DK, DHHV=DV)
        kw.update(kwargs)
        try:
            mlstm_flow.Session(**kw)
        except ValueError as err:
            assert str(err).startswith(arg + ":") or arg in str(err), (arg, str(err))
        else:
            raise AssertionError("Session took a bad %s" % arg)
    try:
        mlstm_flow.Session(NH, DK, DV).push(q[:, :, :, :3], k, v, i, f)
    except ValueError as err:
        assert str(err).startswith("q"), str(err)
    else:
        raise AssertionError("a piece of the wrong DHQK was taken")
    try:
        list(mlstm_flow.Session(NH, DK, DV).stream(pieces, in_flight=-1))
    except ValueError as err:
        assert str(err).startswith("in_flight"), str(err)
    else:
        raise AssertionError("in_flight=-1 was taken")

    # forward(out=) and host_array(): h written in place, from and into the devices' fastest memory
    for devices in ["workers"] + (["0"] if mlstm_flow.devices() else []):
        want, _ = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, devices=devices)
        out = np.zeros_like(want)
        got, _ = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, devices=devices, out=out)
        assert got is out and np.array_equal(out, want), devices
        arrays = []
        for x in (q, k, v, i, f):
            a = mlstm_flow.host_array(x.shape, x.dtype, devices=devices)
            assert a.shape == x.shape and a.dtype == x.dtype and a.flags.writeable
            a[...] = x
            arrays.append(a)
        h_host = mlstm_flow.host_array(want.shape, "float32", devices=devices)
        got, _ = mlstm_flow.forward(*arrays, chunk_size=L, devices=devices, out=h_host)
        assert got is h_host and rel0(h_host, h_ref) < 2e-4, devices
        del arrays, h_host, got
    assert mlstm_flow.host_array((2, 3), "bfloat16", devices="workers").dtype == np.uint16
    for kwargs, arg in [(dict(out=np.zeros((B, NH, S, DV + 1), np.float32)), "out"),
                        (dict(out=np.zeros((B, NH, S, DV), np.float64)), "out"),
                        (dict(out=np.zeros((B, NH, DV, S), np.float32).transpose(0, 1, 3, 2)), "out"),
                        (dict(out=np.zeros((B, NH, S, DV), np.float32), devices=None), "out"),
                        (dict(out=v), "out")]:
        kw = dict(devices="workers", chunk_size=L)
        kw.update(kwargs)
        try:
            mlstm_flow.forward(q, k, v, i, f, **kw)
        except ValueError as err:
            assert str(err).startswith(arg + ":"), str(err)
        else:
            raise AssertionError("forward took a bad %s: %s" % (arg, list(kwargs)))
    # backward(out=): the gradients written into the caller's arrays (any of them; the rest are made), from and into
    # host_array()s, equal to backward() without out=
    dh = rng.standard_normal((B, NH, S, DV), dtype=np.float32)
    for devices in ["workers"] + (["0"] if mlstm_flow.devices() else []):
        want = mlstm_flow.backward(q, k, v, i, f, dh, chunk_size=L, devices=devices)
        mine = {"dq": np.zeros_like(want["dq"]), "df": np.zeros_like(want["df"])}
        got = mlstm_flow.backward(q, k, v, i, f, dh, chunk_size=L, devices=devices, out=mine)
        assert got["dq"] is mine["dq"] and got["df"] is mine["df"], devices
        for key in ("dq", "dk", "dv", "di", "df"):
            assert np.array_equal(got[key], want[key]), (devices, key)
        pinned = [mlstm_flow.host_array(x.shape, x.dtype, devices=devices) for x in (q, k, v, i, f, dh)]
        for a, x in zip(pinned, (q, k, v, i, f, dh)):
            a[...] = x
        grads = {key: mlstm_flow.host_array(want[key].shape, "float32", devices=devices) for key in want}
        got = mlstm_flow.backward(*pinned, chunk_size=L, devices=devices, out=grads)
        for key in ("dq", "dk", "dv", "di", "df"):
            assert got[key] is grads[key] and rel0(got[key], want[key]) < 1e-5, (devices, key)
        del pinned, grads, got
    # keep= / checkpoints=: the forward keeps states (workers: the one leaving the sequence) for a backward of the same
    # arrays, which equals the backward without them; checkpoints of other arrays, of no forward, or without devices=
    # are refused naming the argument
    for devices in ["workers"] + (["0"] if mlstm_flow.devices() else []):
        kept = mlstm_flow.StateCheckpoints()
        h_kept, _ = mlstm_flow.forward(q, k, v, i, f, chunk_size=L, devices=devices, keep=kept)
        assert S in kept.tokens() and kept.nbytes > 0, (devices, kept.tokens())
        want = mlstm_flow.backward(q, k, v, i, f, h_kept, chunk_size=L, devices=devices)
        got = mlstm_flow.backward(q, k, v, i, f, h_kept, chunk_size=L, devices=devices, checkpoints=kept)
        for key in ("dq", "dk", "dv", "di", "df"):
            assert np.array_equal(got[key], want[key]), ("checkpoints", devices, key)
    for kwargs, arg in [(dict(checkpoints=kept, q=q.copy()), "checkpoints"),
                        (dict(checkpoints=mlstm_flow.StateCheckpoints()), "checkpoints"),
                        (dict(checkpoints=kept, devices=None), "checkpoints"),
                        (dict(checkpoints="kept"), "checkpoints")]:
        kw = dict(q=q, devices="workers", chunk_size=L)
        kw.update(kwargs)
        try:
            mlstm_flow.backward(kw.pop("q"), k, v, i, f, h_kept, **kw)
        except ValueError as err:
            assert str(err).startswith(arg + ":"), str(err)
        else:
            raise AssertionError("backward took bad %s: %s" % (arg, list(kwargs)))
    for kwargs in [dict(keep=kept, devices=None), dict(keep=[], devices="workers")]:
        try:
            mlstm_flow.forward(q, k, v, i, f, chunk_size=L, **kwargs)
        except ValueError as err:
            assert str(err).startswith("keep:"), str(err)
        else:
            raise AssertionError("forward took a bad keep: %s" % (kwargs,))
    # dh as bfloat16 patterns (dtype='bfloat16') equals the same values as float32
    dhb = bf(dh)
    dh_exact = (dhb.astype(np.uint32) << 16).view(np.float32)
    qb, kb, vb = bf(q), bf(k), bf(v)
    g16 = mlstm_flow.backward(qb, kb, vb, i, f, dhb, chunk_size=L, dtype="bfloat16", devices="workers")
    g32 = mlstm_flow.backward(qb, kb, vb, i, f, dh_exact, chunk_size=L, dtype="bfloat16", devices="workers")
    assert all(np.array_equal(g16[key], g32[key]) for key in g32), "bfloat16 dh"
    for kwargs, arg in [(dict(out=[]), "out"), (dict(out={"dx": np.zeros(3)}), "out"),
                        (dict(out={"dq": np.zeros((B, NH, S, DK + 1), np.float32)}), "out['dq']"),
                        (dict(out={"di": np.zeros((B, NH, S), np.float64)}), "out['di']"),
                        (dict(out={"dq": np.zeros((B, NH, S, DK), np.float32)}, devices=None), "out"),
                        (dict(out={"dq": q}), "out['dq']"), (dict(out={"dk": q, "dq": q.copy()}), "out['dk']")]:
        kw = dict(devices="workers", chunk_size=L)
        kw.update(kwargs)
        try:
            mlstm_flow.backward(q, k, v, i, f, dh, **kw)
        except ValueError as err:
            assert str(err).startswith(arg + ":"), str(err)
        else:
            raise AssertionError("backward took a bad %s: %s" % (arg, list(kwargs)))
    try:
        mlstm_flow.host_array((2, 3), "int32", devices="workers")
    except ValueError as err:
        assert str(err).startswith("dtype:"), str(err)
    else:
        raise AssertionError("host_array took int32")


def expect_error(exc, arg, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises exc with a one-line message starting with 'arg:'."""
    try:
        fn(*args, **kwargs)
    except exc as err:
        assert str(err).startswith(arg + ":"), (arg, str(err))
        assert "\n" not in str(err), ("a message of several lines", str(err))
    else:
        raise AssertionError("no %s naming %s from %s(%s)" % (exc.__name__, arg, getattr(fn, "__name__", fn),
                                                               ", ".join(sorted(kwargs))))


def check_options_without_effect(rng):
    """gate= and chunk_size= the kernel would ignore are refused naming them, as the command line does: a *_siging
    kernel always uses the sigmoid gate (gate=None, the default, takes it), parallel--* and sequence--* kernels have
    no chunks (chunk_size='auto', the default, is accepted)."""
    B, NH, S, DK, DV = 1, 2, 19, 8, 4
    q, k, v, i, f, dh = float32_inputs(rng, B, NH, S, DK, DV)
    siging = "chunkwise--cpu_xl_chunk_siging"
    expect_error(ValueError, "gate", mlstm_flow.forward, q, k, v, i, f, kernel=siging, gate="exp")
    expect_error(ValueError, "gate", mlstm_flow.backward, q, k, v, i, f, dh, kernel=siging, gate="exp")
    expect_error(ValueError, "gate", mlstm_flow.Session, NH, DK, DV, kernel=siging, gate="exp")
    h_sig = mlstm_flow.forward(q, k, v, i, f, gate="sig", chunk_size=8)[0]
    for gate in (None, "sig"):
        assert np.array_equal(mlstm_flow.forward(q, k, v, i, f, kernel=siging, gate=gate, chunk_size=8)[0], h_sig)
        s = mlstm_flow.Session(NH, DK, DV, kernel=siging, gate=gate, chunk_size=8)
        assert rel0(s.push(q, k, v, i, f), h_sig.astype(np.float64)) < 1e-5
    h_exp = mlstm_flow.forward(q, k, v, i, f, chunk_size=8)[0]
    assert not np.array_equal(h_exp, h_sig)
    assert np.array_equal(mlstm_flow.forward(q, k, v, i, f, gate=None, chunk_size=8)[0], h_exp)  # no kernel: exp
    for kernel in ("parallel--cpu", "sequence--cpu", "parallel--reference_f64", "sequence--reference_f64"):
        expect_error(ValueError, "chunk_size", mlstm_flow.forward, q, k, v, i, f, kernel=kernel, chunk_size=4)
        expect_error(ValueError, "chunk_size", mlstm_flow.backward, q, k, v, i, f, dh, kernel=kernel, chunk_size=4)
        assert mlstm_flow.forward(q, k, v, i, f, kernel=kernel)[0].shape == (B, NH, S, DV)
        assert mlstm_flow.forward(q, k, v, i, f, kernel=kernel, chunk_size="auto")[0].shape == (B, NH, S, DV)
    expect_error(ValueError, "chunk_size", mlstm_flow.Session, NH, DK, DV, kernel="sequence--cpu", chunk_size=4)
    assert mlstm_flow.Session(NH, DK, DV, kernel="sequence--cpu").push(q, k, v, i, f).shape == (B, NH, S, DV)
    # eps is read by the normaliser only: with the sigmoid gate and normalize=False another value is refused.
    expect_error(ValueError, "eps", mlstm_flow.forward, q, k, v, i, f, gate="sig", normalize=False, eps=1e-3)
    expect_error(ValueError, "eps", mlstm_flow.backward, q, k, v, i, f, dh, gate="sig", normalize=False, eps=100.0)
    expect_error(ValueError, "eps", mlstm_flow.Session, NH, DK, DV, gate="sig", normalize=False, eps=1e-3)
    h_off = mlstm_flow.forward(q, k, v, i, f, gate="sig", normalize=False, chunk_size=8)[0]
    assert not np.array_equal(h_off, h_sig)
    assert np.array_equal(mlstm_flow.forward(q, k, v, i, f, gate="sig", normalize=False, eps=1e-6, chunk_size=8)[0], h_off)


def check_stream_keeps_every_piece(rng):
    """Session.stream(pieces, in_flight=2) loses no submitted piece: when the iterator raises or a piece is bad, the
    h of the pieces submitted before it are yielded, then the error is raised (as with in_flight=0), and s.tokens
    counts the pieces yielded; a generator closed early takes its pieces in flight (none is left waiting). It used
    to drop them: s.tokens advanced past the last h yielded."""
    B, NH, DK, DV, P = 1, 2, 8, 4, 5
    q, k, v, i, f, _ = float32_inputs(rng, B, NH, 6 * P, DK, DV)
    pieces = [tuple(x[:, :, j * P:(j + 1) * P] for x in (q, k, v, i, f)) for j in range(6)]
    serial = mlstm_flow.Session(NH, DK, DV, chunk_size=4)
    h_all = np.concatenate([serial.push(*p) for p in pieces], axis=2)

    def failing(after, error):
        yield from pieces[:after]
        raise error

    bad = tuple(x[..., :3] if j == 0 else x for j, x in enumerate(pieces[3]))  # q of DHQK 3
    for in_flight in (0, 2, np.int64(3)):
        for source, exc, arg in [(failing(3, KeyError("source")), KeyError, None),
                                 (pieces[:3] + [bad] + pieces[4:], ValueError, "q"),
                                 (pieces[:3] + [pieces[3][:4]], TypeError, "pieces")]:
            s = mlstm_flow.Session(NH, DK, DV, chunk_size=4)
            got = []
            try:
                for h in s.stream(source, in_flight=in_flight):
                    got.append(h)
            except exc as err:
                assert arg is None or str(err).startswith(arg + ":"), str(err)
            else:
                raise AssertionError("no %s from a stream" % exc.__name__)
            assert len(got) == 3 and s.tokens == 3 * P, (in_flight, exc, len(got), s.tokens)
            assert np.array_equal(np.concatenate(got, axis=2), h_all[:, :, :3 * P]), in_flight
            # the session goes on from the last piece yielded
            assert np.array_equal(s.push(*pieces[3]), h_all[:, :, 3 * P:4 * P])
    # closed early: the pieces submitted ahead are taken (their tickets are gone), counted by s.tokens
    s = mlstm_flow.Session(NH, DK, DV, chunk_size=4)
    stream = s.stream(pieces, in_flight=2)
    assert np.array_equal(next(stream), h_all[:, :, :P])
    stream.close()
    assert s.tokens == 3 * P
    for ticket in (1, 2):  # submitted ahead of the piece yielded (tickets count from 0)
        expect_error(ValueError, "ticket", s.take, ticket)
    assert np.array_equal(s.push(*pieces[3]), h_all[:, :, 3 * P:4 * P])
    s = mlstm_flow.Session(NH, DK, DV, chunk_size=4)
    for h in s.stream(pieces, in_flight=1):
        break
    expect_error(ValueError, "ticket", s.take, 1)
    assert s.tokens == 2 * P
    expect_error(ValueError, "in_flight", s.stream, pieces, in_flight=-1)
    expect_error(TypeError, "in_flight", s.stream, pieces, in_flight=2.0)
    expect_error(TypeError, "in_flight", s.stream, pieces, in_flight=True)
    expect_error(TypeError, "pieces", s.stream, 5)


def check_device_spec_errors(rng):
    """A bad device spec raises a one-line ValueError naming devices (the OpenCL devices found, which the message
    lists, used to follow on lines of their own), from every entry point; empty parts and devices named twice are
    refused ('0,' used to be taken as '0', '0,0' or 'all+all' gave one device two shares)."""
    q, k, v, i, f, _ = float32_inputs(rng, 1, 2, 9, 4, 4)
    found = mlstm_flow.devices()
    bad = ["bogus", "workers:3", "0,", ",0", "0,,1", "workers+", "+0", "workers+workers", "cpu-workers+workers"]
    if found:
        bad += ["%d" % len(found), "0,0", "all+all", "0+all", "workers+0+0"]
    if not any(" gpu " in d for d in found):
        bad += ["gpu:all"]
    for spec in bad:
        expect_error(ValueError, "devices", mlstm_flow.forward, q, k, v, i, f, devices=spec)
        expect_error(ValueError, "devices", mlstm_flow.Session, 2, 4, 4, devices=spec)
        expect_error(ValueError, "devices", mlstm_flow.host_array, (2, 3), devices=spec)
        if "workers" not in spec:
            expect_error(ValueError, "devices", mlstm_flow.Resident, q, k, v, i, f, devices=spec)
    if len(found) >= 2:
        assert mlstm_flow.forward(q, k, v, i, f, devices="1,0", chunk_size=4)[0].shape == v.shape


def check_arguments_named(rng, tmp):
    """Every entry point turns an unknown keyword or an argument of the wrong type into a one-line TypeError naming
    it (pybind11's own "incompatible function arguments" named none, over several lines), names the user's argument
    rather than an internal one, and takes os.PathLike paths."""
    B, NH, S, DK, DV = 1, 2, 9, 4, 3
    q, k, v, i, f, dh = float32_inputs(rng, B, NH, S, DK, DV)
    piece = (q, k, v, i, f)
    s = mlstm_flow.Session(NH, DK, DV)

    def unknown(fn, *args, known=None, **kwargs):
        try:
            fn(*args, **(known or {}), **kwargs)
        except TypeError as err:
            assert "\n" not in str(err) and all("'%s'" % key in str(err) for key in kwargs), str(err)
        else:
            raise AssertionError("an unknown keyword was taken: %s" % list(kwargs))

    unknown(mlstm_flow.Session, NH, DK, DV, foo=1)
    unknown(mlstm_flow.Session.restore, os.path.join(tmp, "none"), NH, DK, DV, foo=1)
    unknown(s.push, *piece, keep=True)
    unknown(s.submit, *piece, keep=True)
    unknown(s.take, 0, wait=True)
    unknown(s.take_state, 0, wait=True)
    unknown(s.start_sequence, c=None)
    unknown(s.forward_sequences, *piece, np.array([0, S]), keep=None)
    unknown(s.state, wait=True)
    unknown(s.snapshot, os.path.join(tmp, "x"), sync=True)
    unknown(mlstm_flow.host_array, (2, 3), known=dict(devices="workers"), pinned=True)
    expect_error(TypeError, "ticket", s.take, "0")
    expect_error(TypeError, "path", s.snapshot, 3)
    expect_error(TypeError, "path", mlstm_flow.Session.restore, b"x", NH, DK, DV)
    expect_error(TypeError, "pieces", lambda: list(s.stream([piece[:4]])))
    # os.PathLike paths
    path = pathlib.Path(tmp) / "state.mlstm"
    s.push(*piece)
    s.snapshot(path)
    assert mlstm_flow.Session.restore(path, NH, DK, DV).tokens == S
    # the user's names: kernel (not the registry's step_kernel), c0/n0/m0 (not the session's C/n/m), dn_last
    try:
        mlstm_flow.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], kernel="bogus")
    except ValueError as err:
        assert str(err).startswith("kernel:") and "reference_f64" in str(err) and "chunkwise" not in str(err), str(err)
    else:
        raise AssertionError("step took kernel='bogus'")
    c0, n0, m0 = (np.zeros(shape, np.float32) for shape in [(B, NH, DK, DV), (B, NH, DK), (B, NH)])
    for bad, arg in [(dict(c0=c0[..., :2]), "c0"), (dict(n0=n0[..., :2]), "n0"), (dict(m0=m0[:, :1]), "m0")]:
        state = dict(c0=c0, n0=n0, m0=m0)
        state.update(bad)
        expect_error(ValueError, arg, s.start_sequence, **state)
        expect_error(ValueError, arg, mlstm_flow.Session, NH, DK, DV, **state)
    expect_error(TypeError, "shape", mlstm_flow.host_array, 10, devices="workers")
    expect_error(ValueError, "shape", mlstm_flow.host_array, (2, -3), devices="workers")
    expect_error(ValueError, "dtype", mlstm_flow.host_array, (2, 3), "bogus", devices="workers")
    expect_error(TypeError, "dtype", mlstm_flow.host_array, (2, 3), 5, devices="workers")
    # a copy that cannot be made (a broadcast view of 256 GiB) is said to be one, naming q
    big = np.broadcast_to(q[:, :, :1], (B, NH, 2**33, DK))
    expect_error(MemoryError, "q", mlstm_flow.forward, big, k, v, i, f)
    if mlstm_flow.devices():
        unknown(mlstm_flow.Resident, *piece, known=dict(devices="0"), cu_seqlens=np.array([0, S]))
        expect_error(ValueError, "dn_last", mlstm_flow.Resident, *piece, devices="0", dn_last=n0)
        expect_error(ValueError, "dc_last", mlstm_flow.Resident, *piece, devices="0", dc_last=c0)
        expect_error(TypeError, "weights", mlstm_flow.Resident, *piece, devices="0", weights=3)
        r = mlstm_flow.Resident(*piece, devices="0")
        for method in (r.forward, r.backward, r.read_forward, r.read_backward):
            unknown(method, now=True)


def check_argument_mismatches(rng):
    """Issue 21 item 5: a call whose arguments fit no signature -- a required argument missing, too many positional
    arguments, one given both by position and by keyword, an unknown keyword where a function takes none -- raises a
    one-line TypeError naming the function and the argument (pybind11's own "incompatible function arguments" listed
    the signature over several lines and named none), from every public function, method and constructor; the
    table below must list every one the module has. Each call fails before the function runs."""
    q, k, v, i, f, _ = float32_inputs(rng, 1, 2, 9, 4, 3)
    s = mlstm_flow.Session(2, 4, 3)
    kept = mlstm_flow.StateCheckpoints()
    r = mlstm_flow.Resident(q, k, v, i, f, devices="0") if mlstm_flow.devices() else None
    # name: (callable, required arguments, first parameter, count of positional parameters)
    calls = {
        "forward": (mlstm_flow.forward, "q k v i f", "q", 22),
        "backward": (mlstm_flow.backward, "q k v i f dh", "q", 24),
        "step": (mlstm_flow.step, "q k v i f", "q", 13),
        "host_array": (mlstm_flow.host_array, "shape", "shape", 3),
        "kernels": (mlstm_flow.kernels, "", None, 0),
        "devices": (mlstm_flow.devices, "", None, 0),
        "StateCheckpoints": (mlstm_flow.StateCheckpoints, "", None, 0),
        "StateCheckpoints.tokens": (kept.tokens, "", None, 0),
        "Session": (mlstm_flow.Session, "NH DHQK DHHV", "NH", 15),
        "Session.restore": (mlstm_flow.Session.restore, "path NH DHQK DHHV", "path", 13),
        "Session.push": (s.push, "q k v i f", "q", 5),
        "Session.submit": (s.submit, "q k v i f", "q", 6),
        "Session.take": (s.take, "ticket", "ticket", 1),
        "Session.take_state": (s.take_state, "ticket", "ticket", 1),
        "Session.start_sequence": (s.start_sequence, "", "c0", 3),
        "Session.forward_sequences": (s.forward_sequences, "q k v i f cu_seqlens", "q", 9),
        "Session.state": (s.state, "", None, 0),
        "Session.snapshot": (s.snapshot, "path", "path", 1),
        "Session.stream": (s.stream, "pieces", "pieces", 2),  # Python's own messages
        "Resident": (mlstm_flow.Resident, "q k v i f", "q", 19),
    }
    for method in ("forward", "backward", "read_forward", "read_backward"):
        calls["Resident." + method] = (getattr(r, method, None), "", None, 0)
    public = set()
    for name, value in vars(mlstm_flow).items():
        if name.startswith("_") or not callable(value):
            continue
        public.add(name)
        if isinstance(value, type):
            public.update(name + "." + member for member, attr in vars(value).items()
                          if not member.startswith("_") and not isinstance(attr, property))
    assert public == set(calls), ("functions without a case here", sorted(public ^ set(calls)))

    def refused(name, fn, args, kwargs, *parts):
        try:
            fn(*args, **kwargs)
        except TypeError as err:
            msg = str(err)
            assert "\n" not in msg and msg.startswith(name + "()"), (name, msg)
            assert all(part in msg for part in parts), (name, parts, msg)
        else:
            raise AssertionError("%s took %d positional arguments and %s" % (name, len(args), sorted(kwargs)))

    x = object()  # no value is looked at: the call is refused before
    for name, (fn, required, first, count) in calls.items():
        if fn is None:  # Resident's methods without an OpenCL device
            continue
        required = required.split()
        if required:  # missing: the last by position, the first by keyword
            refused(name, fn, [x] * (len(required) - 1), {}, "missing", "'%s'" % required[-1])
            refused(name, fn, [], {n: x for n in required[1:]}, "missing", "'%s'" % required[0])
        refused(name, fn, [x] * (count + 1), {}, "given")
        if first:
            refused(name, fn, [x], {first: x}, "multiple values for argument '%s'" % first)
        else:
            refused(name, fn, [], {"bogus": x}, "unexpected keyword argument", "'bogus'")
    expect = {
        "forward": ("forward(q=q)", "forward(): missing required argument 'k' (pass q, k, v, i, f)"),
        "too many": ("forward(*range(23))", "forward(): takes at most 22 positional arguments (23 given)"),
        "twice": ("forward(q, k, v, i, f, q=q)", "forward(): got multiple values for argument 'q'"),
        "take": ("s.take(0, 1)", "Session.take(): takes 1 positional argument (2 given)"),
        "kernels": ("mlstm_flow.kernels(1)", "kernels(): takes no arguments (1 given)"),
        "unbound": ("mlstm_flow.Session.push(3)", "Session.push(): self must be a Session, got int"),
    }
    for code, message in expect.values():
        try:
            eval(code, {"mlstm_flow": mlstm_flow, "forward": mlstm_flow.forward, "s": s, "q": q, "k": k, "v": v,
                        "i": i, "f": f})
        except TypeError as err:
            assert str(err) == message, (code, str(err))
        else:
            raise AssertionError(code + " was taken")
    assert s.tokens == 0, s.tokens
    # The docs still show the one signature each function has (not pybind11's "Overloaded function" list).
    for fn in (mlstm_flow.forward, mlstm_flow.Session.push, mlstm_flow.Session.__init__, mlstm_flow.Session.restore):
        assert "Overloaded" not in fn.__doc__ and "*args" not in fn.__doc__, fn.__doc__
    assert mlstm_flow.forward.__doc__.startswith("forward(q: object, k: object"), mlstm_flow.forward.__doc__
    # valid calls are as before
    assert mlstm_flow.forward(q, k, v, i, f, return_last_states=False).shape == v.shape
    assert s.push(q, k, v, i, f).shape == v.shape and s.tokens == q.shape[2]
    print("argument mismatches: one line naming the function and the argument, from every entry point")


def run_threads(work, count):
    """work(t) on `count` threads at once (started together); the exceptions they raised, as strings."""
    errors = []
    barrier = threading.Barrier(count)

    def body(t):
        try:
            barrier.wait()
            work(t)
        except Exception as err:  # noqa: BLE001 -- reported by the caller
            errors.append("thread %d: %s: %s" % (t, type(err).__name__, err))

    threads = [threading.Thread(target=body, args=(t,)) for t in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


FIRST_USE_CHILD = """
import sys, threading
import numpy as np
import mlstm_flow
rng = np.random.default_rng(0)
x = [rng.standard_normal(s).astype(np.float32) for s in [(1, 2, 9, 4), (1, 2, 9, 4), (1, 2, 9, 3), (1, 2, 9), (1, 2, 9)]]
errors = []
def work(spec):
    try:
        if spec == "list":
            mlstm_flow.devices()
        else:
            mlstm_flow.forward(*x, devices=spec, chunk_size=2)
    except Exception as err:
        errors.append("%s: %s: %s" % (spec, type(err).__name__, err))
threads = [threading.Thread(target=work, args=(s,)) for s in sys.argv[1:]]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
sys.exit(1 if errors else 0)
"""


def check_first_use_from_threads():
    """The first use of OpenCL in a process from several threads at once (a child process each time, so that it is the
    first): the devices used to be enumerated in every thread at once, crashing inside PoCL or finding too few."""
    count = len(mlstm_flow.devices())
    if count < 2:
        return
    specs = ["0", "1", "0,1", "workers+0", "list", "1", "0"]
    for attempt in range(4):
        child = subprocess.run([sys.executable, "-c", FIRST_USE_CHILD] + specs, capture_output=True, text=True,
                               timeout=300)
        assert child.returncode == 0, (attempt, child.returncode, child.stdout[-2000:], child.stderr[-2000:])


def check_threads(rng):
    """One Session or Resident shared by several Python threads: the calls take turns (each object has a lock; the
    GIL is released while they wait). They used to run at once without the GIL: crashes (double free, an abort in
    the OpenCL runtime) or pieces silently lost."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        B, NH, DK, DV = 1, 2, 4, 3
        piece = [rng.standard_normal(s).astype(np.float32) for s in [(B, NH, 1, DK), (B, NH, 1, DK), (B, NH, 1, DV),
                                                                      (B, NH, 1), (B, NH, 1)]]
        threads, pushes = 6, 40
        for devices in [None, "workers"] + (["0,1"] if len(mlstm_flow.devices()) >= 2 else []):
            what = "Session devices=%r" % (devices,)
            serial = mlstm_flow.Session(NH, DK, DV, devices=devices, chunk_size=2)
            for _ in range(threads * pushes):
                serial.push(*piece)
            s = mlstm_flow.Session(NH, DK, DV, devices=devices, chunk_size=2)

            def work(t):
                for _ in range(pushes):
                    if t % 2:
                        assert s.push(*piece).shape == (B, NH, 1, DV)
                    else:
                        assert s.take(s.submit(*piece)).shape == (B, NH, 1, DV)
                    s.tokens

            errors = run_threads(work, threads)
            assert not errors, (what, errors)
            assert s.tokens == threads * pushes, (what, s.tokens)
            # the pieces are all the same: whatever order they ran in, the state is the serial one
            for a, b in zip(s.state(), serial.state()):
                assert np.allclose(a, b, rtol=1e-5, atol=1e-6), what
        if len(mlstm_flow.devices()) >= 2:
            S = 9
            q, k, v, i, f = [rng.standard_normal(s).astype(np.float32) for s in [(B, NH, S, DK), (B, NH, S, DK),
                                                                                 (B, NH, S, DV), (B, NH, S), (B, NH, S)]]
            h_ref, _ = mlstm_flow.forward(q, k, v, i, f, chunk_size=2)
            r = mlstm_flow.Resident(q, k, v, i, f, devices="0,1", chunk_size=2)
            results = []

            def run_resident(t):
                for _ in range(6):
                    r.forward()
                    results.append(r.read_forward()["h"])
                    r.parts, r.lost

            errors = run_threads(run_resident, 4)
            assert not errors, errors
            assert len(results) == 24 and all(rel0(h, h_ref.astype(np.float64)) < 1e-4 for h in results)
    finally:
        sys.setswitchinterval(old)


def cli_path():
    """The mlstm command line: $MLSTM_CLI (ctest sets it), else the one beside this build's module (build/python ->
    build/tools/mlstm), or None."""
    if os.environ.get("MLSTM_CLI"):
        return os.environ["MLSTM_CLI"]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        exe = pathlib.Path(entry or ".").resolve().parent / "tools" / "mlstm"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def check_input_gate_plus_inf(rng):
    """An input gate of +inf (exp gate) is taken as the largest float32 (stages.hpp "Gates at +-inf"): every entry
    point runs it, equal to the same call at i = 3.4028235e38, and the state leaves at m = that value; a float64
    1e300 reads as +inf in float32 and runs the same. Backward and step too; NaN stays refused."""
    B, NH, S, DK, DV = 1, 2, 37, 8, 8
    q, k, v, i, f, dh = float32_inputs(rng, B, NH, S, DK, DV)
    top = np.finfo(np.float32).max
    i_inf, i_max = i.copy(), i.copy()
    i_inf[..., [1, 20, S - 2]] = np.inf
    i_max[..., [1, 20, S - 2]] = top
    i_big = i_inf.astype(np.float64)
    i_big[np.isinf(i_big)] = 1e300
    for kw in ({}, {"kernel": "sequence--reference_f64"}, {"kernel": "parallel--cpu"}, {"devices": "workers"},
               {"devices": "0,1"}):
        want, (_, _, m_want) = mlstm_flow.forward(q, k, v, i_max, f, **kw)
        assert (m_want == top).all(), (kw, m_want)
        for gates, ff in ((i_inf, f), (i_big, f.astype(np.float64))):
            got, (_, _, m_got) = mlstm_flow.forward(q, k, v, gates, ff, **kw)
            assert np.array_equal(got, want), kw
            assert np.array_equal(m_got, m_want), kw
    g_inf = mlstm_flow.backward(q, k, v, i_inf, f, dh)
    g_max = mlstm_flow.backward(q, k, v, i_max, f, dh)
    for name in ("dq", "dk", "dv", "di", "df"):
        assert np.array_equal(g_inf[name], g_max[name]), name
    c = np.zeros((B, NH, DK, DV), np.float32)
    n = np.zeros((B, NH, DK), np.float32)
    m = np.zeros((B, NH), np.float32)
    h1, (_, _, m1) = mlstm_flow.step(q[:, :, 1], k[:, :, 1], v[:, :, 1], i_inf[:, :, 1], f[:, :, 1], c, n, m)
    assert np.isfinite(h1).all() and (m1 == top).all()
    bad = i.copy()
    bad[0, 1, 3] = np.nan
    expect_error(ValueError, "i", mlstm_flow.forward, q, k, v, bad, f)


def check_stabiliser_plus_inf(rng):
    """Probe 39: an initial stabiliser m0 = +inf (exp gate) is outside the recurrence's domain (the
    chunkwise and graph forms gave h = 0, the sequence forms and references NaN): every entry point refuses it with a
    ValueError naming m0 (step: m), also a float64 m0 beyond float32's range, and NaN (which the forms disagreed on
    the same way); -inf (the empty state) stays valid."""
    B, NH, S, DK, DV = 1, 2, 37, 8, 8
    q, k, v, i, f, dh = float32_inputs(rng, B, NH, S, DK, DV)
    c0 = rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    n0 = rng.standard_normal((B, NH, DK)).astype(np.float32)
    for bad in (np.full((B, NH), np.inf, np.float32), np.array([[0.5, 1e300]]), np.array([[np.nan, 0.5]])):
        for kw in ({}, {"kernel": "sequence--reference_f64"}, {"kernel": "sequence--cpu"},
                   {"kernel": "parallel--reference_f64"}, {"devices": "workers"}, {"devices": "0"}):
            expect_error(ValueError, "m0", mlstm_flow.forward, q, k, v, i, f, c0, n0, bad, **kw)
        expect_error(ValueError, "m0", mlstm_flow.backward, q, k, v, i, f, dh, c0, n0, bad)
        expect_error(ValueError, "m0", mlstm_flow.backward, q, k, v, i, f, dh, c0, n0, bad, devices="workers")
        expect_error(ValueError, "m", mlstm_flow.step, q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0],
                     c0, n0, bad)
        expect_error(ValueError, "m0", mlstm_flow.Session, NH, DK, DV, c0=c0, n0=n0, m0=bad)
        s = mlstm_flow.Session(NH, DK, DV)
        expect_error(ValueError, "m0", s.start_sequence, c0, n0, bad)
        expect_error(ValueError, "m0", s.forward_sequences, q, k, v, i, f, np.array([0, S], np.int64), c0, n0, bad)
        expect_error(ValueError, "m0", mlstm_flow.Resident, q, k, v, i, f, devices="0", c0=c0, n0=n0, m0=bad)
    # The sigmoid gate has no stabiliser: m0 other than 0 is refused (as before), naming m0.
    expect_error(ValueError, "m0", mlstm_flow.forward, q, k, v, i, f, c0, n0, np.full((B, NH), np.inf), gate="sig")
    # -inf: the empty state (C = n = 0 carry nothing), h as from the zero state with m0 = -inf.
    empty = np.full((B, NH), -np.inf, np.float32)
    h, _ = mlstm_flow.forward(q, k, v, i, f, np.zeros_like(c0), np.zeros_like(n0), empty,
                              kernel="sequence--reference_f64")
    assert np.isfinite(h).all()
    h2, _ = mlstm_flow.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], c0, n0, empty)
    assert np.isfinite(h2).all()


def check_bfloat16_gates_and_states(rng, tmp):
    """Probe 39: with dtype='bfloat16', uint16 gates (i, f), states (c0, n0, m0; a step's c, n, m) and gradients
    (dh, dc_last, dn_last) are bfloat16 bit patterns in every entry point, as the command line's --dtype bfloat16
    reads them (they were refused with "unsupported dtype uint16; expected ... or uint16 with dtype='bfloat16'"):
    the same bits give bitwise the results the command line writes."""
    B, NH, S, DK, DV = 1, 2, 37, 8, 8
    to_bf16 = lambda x: (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    from_bf16 = lambda x: (x.astype(np.uint32) << 16).view(np.float32)
    q, k, v, i, f, dh = (to_bf16(x) for x in float32_inputs(rng, B, NH, S, DK, DV))
    c0 = to_bf16(rng.standard_normal((B, NH, DK, DV)))
    n0 = to_bf16(rng.standard_normal((B, NH, DK)))
    m0 = to_bf16(rng.standard_normal((B, NH)))
    dc, dn = to_bf16(rng.standard_normal((B, NH, DK, DV))), to_bf16(rng.standard_normal((B, NH, DK)))
    bf = {"dtype": "bfloat16"}
    h, (c, n, m) = mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, **bf)
    assert h.dtype == np.uint16 and h.shape == (B, NH, S, DV)
    g = mlstm_flow.backward(q, k, v, i, f, dh, c0, n0, m0, dc_last=dc, dn_last=dn, **bf)
    assert g["di"].dtype == np.uint16 and g["dq"].dtype == np.uint16  # di, df in the gates' dtype, as the CLI's
    t = lambda x: x[:, :, 0]
    hs, (cs, ns, ms) = mlstm_flow.step(t(q), t(k), t(v), t(i), t(f), c0, n0, m0, **bf)
    exe = cli_path()
    assert exe is not None, "the mlstm command line was not found beside the module (PYTHONPATH)"
    files = {}
    for name, x in dict(q=q, k=k, v=v, i=i, f=f, c0=c0, n0=n0, m0=m0, dh=dh, dc=dc, dn=dn, sq=t(q), sk=t(k), sv=t(v),
                        si=t(i), sf=t(f)).items():
        files[name] = os.path.join(tmp, "bf_%s.npy" % name)
        np.save(files[name], x)
    out = lambda name: os.path.join(tmp, "bf_out_%s.npy" % name)
    ins = ["--q", files["q"], "--k", files["k"], "--v", files["v"], "--i", files["i"], "--f", files["f"],
           "--c0", files["c0"], "--n0", files["n0"], "--m0", files["m0"], "--dtype", "bfloat16"]
    env = dict(os.environ, POCL_DEVICES=os.environ.get("POCL_DEVICES", "pthread pthread"))
    for argv in (["forward"] + ins + ["--out", out("h"), "--out-c", out("c")],
                 ["backward"] + ins + ["--dh", files["dh"], "--dc", files["dc"], "--dn", files["dn"], "--out-dq",
                                       out("dq"), "--out-di", out("di"), "--out-df", out("df"), "--out-dm0",
                                       out("dm0")],
                 ["step", "--q", files["sq"], "--k", files["sk"], "--v", files["sv"], "--i", files["si"], "--f",
                  files["sf"], "--c", files["c0"], "--n", files["n0"], "--m", files["m0"], "--dtype", "bfloat16",
                  "--out", out("sh"), "--out-c", out("sc")]):
        r = subprocess.run([exe] + argv, capture_output=True, text=True, env=env)
        assert r.returncode == 0, (argv[0], r.stderr)
    for got, name in ((h, "h"), (c, "c"), (g["dq"], "dq"), (g["di"], "di"), (g["df"], "df"), (g["dm0"], "dm0"),
                      (hs, "sh"), (cs, "sc")):
        want = np.load(out(name))
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), name
    # Every other entry point takes them too, bitwise as forward() (a Session, its stream, forward_sequences, the
    # flow graph, host_array memory, a Resident).
    hg, _ = mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, devices="workers", **bf)
    assert hg.dtype == np.uint16
    assert rel0(from_bf16(hg), from_bf16(h).astype(np.float64)) < 2e-2
    ig = mlstm_flow.host_array(i.shape, "bfloat16", devices="workers")
    ig[...] = i
    hh, _ = mlstm_flow.forward(q, k, v, ig, f, c0, n0, m0, devices="workers", **bf)
    assert np.array_equal(hh, hg)
    s = mlstm_flow.Session(NH, DK, DV, c0=c0, n0=n0, m0=m0, **bf)
    hp = np.concatenate([s.push(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], i[:, :, a:b], f[:, :, a:b])
                         for a, b in ((0, 20), (20, S))], axis=2)
    assert hp.dtype == np.uint16 and rel0(from_bf16(hp), from_bf16(h).astype(np.float64)) < 2e-2
    s.start_sequence(c0, n0, m0)
    hst = np.concatenate(list(s.stream([(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], i[:, :, a:b], f[:, :, a:b])
                                        for a, b in ((0, 20), (20, S))])), axis=2)
    assert np.array_equal(hst, hp)
    s.start_sequence()
    hq, _ = s.forward_sequences(q, k, v, i, f, np.array([0, S], np.int64), c0, n0, m0)
    assert rel0(from_bf16(hq), from_bf16(h).astype(np.float64)) < 2e-2
    r = mlstm_flow.Resident(q, k, v, i, f, devices="0", dh=dh, c0=c0, n0=n0, m0=m0, dc_last=dc, dn_last=dn, **bf)
    r.forward()
    r.backward()
    assert rel0(from_bf16(r.read_forward()["h"]), from_bf16(h).astype(np.float64)) < 2e-2
    assert r.read_backward()["di"].dtype == np.uint16
    # uint16 without dtype='bfloat16', and a truly unsupported dtype: messages that do not contradict themselves.
    for fn, args in ((mlstm_flow.forward, (from_bf16(q), from_bf16(k), from_bf16(v), i, from_bf16(f))),):
        try:
            fn(*args)
        except ValueError as err:
            assert str(err).startswith("i:") and "only with dtype='bfloat16'" in str(err), str(err)
        else:
            raise AssertionError("uint16 i without dtype='bfloat16' was accepted")
    # A step's state keywords are c, n, m (were named c0, n0, m0 in dtype errors).
    expect_error(ValueError, "m", mlstm_flow.step, t(q), t(k), t(v), t(i), t(f), c0, n0, m0.astype(np.int32), **bf)
    expect_error(ValueError, "c", mlstm_flow.step, t(q), t(k), t(v), t(i), t(f), c0.astype(np.int8), n0, m0, **bf)
    try:
        mlstm_flow.forward(q, k, v, i.astype(np.int32), f, **bf)
    except ValueError as err:
        assert str(err).startswith("i:") and "with dtype='bfloat16'" not in str(err), str(err)
    else:
        raise AssertionError("int32 i was accepted")


def check_resident_and_host_array_messages(rng):
    """Probe 39: Resident.backward()/read_backward() without dh raise a one-line ValueError naming dh (was a
    RuntimeError naming ResidentSplit); host_array of a shape no memory holds names shape and the size, before
    allocating (was MemoryError std::bad_alloc, or clCreateBuffer's CL_INVALID_BUFFER_SIZE)."""
    q, k, v, i, f, _ = float32_inputs(rng, 1, 2, 40, 8, 8)
    r = mlstm_flow.Resident(q, k, v, i, f, devices="0")
    r.forward()
    expect_error(ValueError, "dh", r.backward)
    expect_error(ValueError, "dh", r.read_backward)
    for devices in ("workers", "0", "workers+0"):
        for shape in ((2**40, 2**20), (2**62, 4), (2**31, 2**31, 2**31)):
            try:
                mlstm_flow.host_array(shape, devices=devices)
            except ValueError as err:
                assert str(err).startswith("shape:") and "\n" not in str(err), str(err)
                assert "bytes" in str(err), str(err)
            else:
                raise AssertionError("host_array%s on %s was accepted" % (shape, devices))
    # Within the host's memory but past the largest buffer of PoCL's CPU device (its page-locked memory): refused
    # before clCreateBuffer (was CL_INVALID_BUFFER_SIZE). Only where device 0 is PoCL's: a GPU may hold it.
    if "pthread" in mlstm_flow.devices()[0]:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        try:
            mlstm_flow.host_array((int(memory * 0.9) // 4,), devices="0")
        except ValueError as err:
            assert str(err).startswith("shape:") and "largest buffer" in str(err), str(err)
        else:
            raise AssertionError("host_array of 90% of the host's memory on PoCL's device 0 was accepted")
    assert mlstm_flow.host_array((3, 5), devices="0").shape == (3, 5)


def main():
    seed = seed_from_env()
    print(f"seed: MLSTM_TEST_SEED={seed}")
    rng = np.random.default_rng(seed)
    B, NH, S, DK, DV = 2, 3, 77, 16, 24
    q = rng.standard_normal((B, NH, S, DK), dtype=np.float32)
    k = rng.standard_normal((B, NH, S, DK), dtype=np.float32)
    v = rng.standard_normal((B, NH, S, DV), dtype=np.float32)
    i = rng.standard_normal((B, NH, S), dtype=np.float32)
    f = (3 + rng.standard_normal((B, NH, S))).astype(np.float32)
    c0 = 0.5 * rng.standard_normal((B, NH, DK, DV)).astype(np.float32)
    n0 = 0.5 * rng.standard_normal((B, NH, DK)).astype(np.float32)
    m0 = rng.standard_normal((B, NH)).astype(np.float32)

    h, (c, n, m) = mlstm_flow.forward(q, k, v, i, f, c0, n0, m0, chunk_size=32)
    h_ref, (c_ref, n_ref, m_ref) = reference(q, k, v, i, f, c0, n0, m0)
    assert h.dtype == np.float32 and h.shape == (B, NH, S, DV)
    assert rel0(h, h_ref) < 1e-4, rel0(h, h_ref)
    assert rel0(c, c_ref) < 1e-4 and rel0(m, m_ref) < 1e-5

    # float16 inputs, and bfloat16 passed as uint16
    h16, _ = mlstm_flow.forward(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), i, f)
    assert h16.dtype == np.float16
    assert rel0(h16, reference(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), i, f)[0]) < 2e-2
    to_bf16 = lambda x: ((x.astype(np.float32).view(np.uint32) + 0x7FFF + ((x.astype(np.float32).view(np.uint32) >> 16) & 1)) >> 16).astype(np.uint16)
    from_bf16 = lambda x: (x.astype(np.uint32) << 16).view(np.float32)
    hb, _ = mlstm_flow.forward(to_bf16(q), to_bf16(k), to_bf16(v), i, f, dtype="bfloat16")
    assert hb.dtype == np.uint16
    hb_ref, _ = reference(from_bf16(to_bf16(q)), from_bf16(to_bf16(k)), from_bf16(to_bf16(v)), i, f)
    assert rel0(from_bf16(hb), hb_ref) < 2e-2

    # backward: finite-difference check of one q element through the library itself
    dh = rng.standard_normal((B, NH, S, DV)).astype(np.float32)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    g = mlstm_flow.backward(q64, k64, v64, i, f, dh, c0=c0, n0=n0, m0=m0, kernel="parallel--reference_f64")
    assert set(["dq", "dk", "dv", "di", "df", "dc0", "dn0", "dm0"]) <= set(g)
    g_cpu = mlstm_flow.backward(q, k, v, i, f, dh, c0=c0, n0=n0, m0=m0)
    assert rel0(g_cpu["dk"], g["dk"].astype(np.float64)) < 1e-3
    qp = q.astype(np.float64).copy()
    e = (1, 2, 10, 3)
    step = 1e-4
    qp[e] += step
    lp = np.sum(reference(qp, k, v, i, f, c0, n0, m0)[0] * dh)
    qp[e] -= 2 * step
    lm = np.sum(reference(qp, k, v, i, f, c0, n0, m0)[0] * dh)
    fd = (lp - lm) / (2 * step)
    assert abs(fd - g["dq"][e]) < 1e-4 * max(1.0, abs(fd)), (fd, g["dq"][e])

    # step == one token of the recurrence
    hs, (cs, ns, ms) = mlstm_flow.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], c0, n0, m0)
    assert rel0(hs, h_ref[:, :, 0]) < 1e-4

    names = [x["name"] for x in mlstm_flow.kernels()]
    assert "chunkwise--cpu_xl_chunk" in names
    assert isinstance(mlstm_flow.devices(), list)

    # errors name the argument
    for bad, arg in [(dict(k=k[..., :5]), "k"), (dict(chunk_size=0), "chunk_size"), (dict(chunk_size="fast"), "chunk_size"),
                     (dict(chunk_size=2**31), "chunk_size"), (dict(kernel="nope"), "kernel")]:
        kw = dict(q=q, k=k, v=v, i=i, f=f)
        kw.update(bad)
        try:
            mlstm_flow.forward(**kw)
        except ValueError as err:
            assert str(err).startswith(arg + ":"), str(err)
        else:
            raise AssertionError("no ValueError for " + arg)
    # Issue 21: arrays in non-native byte order or of unsupported dtypes are refused naming the argument (they
    # used to be read as raw bytes: silently wrong answers); eps is checked in float32; a chunk size beyond
    # the sequence is the sequence (no allocation scaled by it).
    for bad, arg in [(dict(q=q.astype(">f4")), "q"), (dict(v=v.astype(np.int32)), "v"), (dict(f=f.astype(">f8")), "f"),
                     (dict(c0=c0.astype(">f4"), n0=n0, m0=m0), "c0"), (dict(i=i.astype(np.complex64)), "i"),
                     (dict(eps=1e-46), "eps"), (dict(eps=1e39), "eps"), (dict(chunk_size=2**40), "chunk_size"),
                     (dict(dtype="float16"), "dtype"), (dict(normalize=False), "normalize"),
                     (dict(devices="gpu:7"), "devices")]:
        kw = dict(q=q, k=k, v=v, i=i, f=f)
        kw.update(bad)
        try:
            mlstm_flow.forward(**kw)
        except ValueError as err:
            assert str(err).startswith(arg + ":"), str(err)
        else:
            raise AssertionError("no ValueError for " + arg + " in " + str(list(bad)))
    try:
        mlstm_flow.step(q[:, :, 0].astype(">f4"), k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0])
    except ValueError as err:
        assert str(err).startswith("q:"), str(err)
    else:
        raise AssertionError("no ValueError for a big-endian q in step")
    # Issue 21 item 6 (found by fuzz_bindings.py): scalar arguments of the wrong type raise TypeError naming the
    # argument, out-of-range ints ValueError; unknown keywords TypeError naming them; dtype='bfloat16' with
    # float arrays (it used to be ignored) ValueError naming the array.
    for bad, arg, exc in [(dict(chunk_size=None), "chunk_size", TypeError), (dict(chunk_size=3.5), "chunk_size", TypeError),
                          (dict(chunk_size=2**64), "chunk_size", ValueError), (dict(eps="1e-6"), "eps", TypeError),
                          (dict(eps=None), "eps", TypeError), (dict(normalize=1), "normalize", TypeError),
                          (dict(kernel=0), "kernel", TypeError), (dict(gate=0), "gate", TypeError),
                          (dict(dtype=None), "dtype", TypeError), (dict(devices=0), "devices", TypeError),
                          (dict(return_last_states=None), "return_last_states", TypeError),
                          (dict(dtype="bfloat16"), "q", ValueError)]:
        kw = dict(q=q, k=k, v=v, i=i, f=f)
        kw.update(bad)
        try:
            mlstm_flow.forward(**kw)
        except exc as err:
            assert str(err).startswith(arg + ":"), str(err)
        else:
            raise AssertionError("no %s for %s in %s" % (exc.__name__, arg, list(bad)))
    for fn, args in [(mlstm_flow.forward, (q, k, v, i, f)), (mlstm_flow.backward, (q, k, v, i, f, np.ones_like(v))),
                     (mlstm_flow.step, (q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0]))]:
        try:
            fn(*args, chunksize=8)
        except TypeError as err:
            assert "'chunksize'" in str(err), str(err)
        else:
            raise AssertionError("no TypeError for an unknown keyword")
    assert mlstm_flow.forward(q, k, v, i, f, chunk_size=np.int64(16), eps=np.float32(1e-6),
                              normalize=np.bool_(True))[0].shape == (B, NH, S, DV)
    h_sig = mlstm_flow.forward(q, k, v, i, f, gate="sig", return_last_states=False)
    h_nonorm = mlstm_flow.forward(q, k, v, i, f, gate="sig", normalize=False, return_last_states=False)
    assert not np.array_equal(h_sig, h_nonorm)
    h_big, _ = mlstm_flow.forward(q, k, v, i, f, chunk_size=2**31 - 1)
    h_seq, _ = mlstm_flow.forward(q, k, v, i, f, chunk_size=S)
    assert np.array_equal(h_big, h_seq)
    check_graph(rng)
    check_resident(rng)
    check_packed(rng)
    check_streaming_and_memory(rng)
    check_threads(rng)
    check_options_without_effect(rng)
    check_stream_keeps_every_piece(rng)
    check_device_spec_errors(rng)
    with tempfile.TemporaryDirectory() as tmp:
        check_arguments_named(rng, tmp)
    check_argument_mismatches(rng)
    check_stabiliser_plus_inf(rng)
    check_input_gate_plus_inf(rng)
    with tempfile.TemporaryDirectory() as tmp:
        check_bfloat16_gates_and_states(rng, tmp)
    check_resident_and_host_array_messages(rng)
    check_first_use_from_threads()
    print("python bindings: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
