# mlstm_kernels' Triton kernels (TFLA), timed on the GPU machine in the same call as ours (scripts/gpu_tfla_compare.sh):
# forward and forward+backward, chunk 128, bf16, q,k,v,i ~ N(0,1), f = 3 + N(0,1), device-resident. Median ms of
# triton.testing.do_bench. TFLA_SRC: a checkout of github.com/NX-AI/mlstm_kernels (its package directory's parent);
# TFLA_SHAPES: comma list of B:NH:S:DHQK:DHHV; TFLA_KERNELS: xl_chunk, xl_chunk_siging. Writes $OUT/tfla.json.
import os, sys, json
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("TFLA_SRC", here))
try:
    import einops  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(here, "shim"))
import torch, triton
from mlstm_kernels.torch.chunkwise.triton_xl_chunk import mlstm_chunkwise__xl_chunk
from mlstm_kernels.torch.chunkwise.triton_xl_chunk_siging import mlstm_siging_chunkwise__xl_chunk

kernels = {"xl_chunk": mlstm_chunkwise__xl_chunk, "xl_chunk_siging": mlstm_siging_chunkwise__xl_chunk}
shapes = [s.split(":") for s in os.environ.get("TFLA_SHAPES", "8:16:8192:128:256,1:16:65536:128:256").split(",")]
names = os.environ.get("TFLA_KERNELS", "xl_chunk,xl_chunk_siging").split(",")
rows = []
print("device", torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__, flush=True)
for B, NH, S, DK, DV in [tuple(int(x) for x in s) for s in shapes]:
    g = torch.Generator(device="cuda").manual_seed(0)
    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32)
    q = rnd(B, NH, S, DK).bfloat16(); k = rnd(B, NH, S, DK).bfloat16(); v = rnd(B, NH, S, DV).bfloat16()
    i = rnd(B, NH, S).bfloat16(); f = (3.0 + rnd(B, NH, S)).bfloat16()
    dh = rnd(B, NH, S, DV).bfloat16()
    for name in names:
        fn = kernels[name]
        try:
            fw = lambda: fn(q, k, v, i, f, chunk_size=128)
            fw()
            torch.cuda.synchronize()
            t_fw = triton.testing.do_bench(fw, warmup=25, rep=200, return_mode="median")
            qs, ks, vs, is_, fs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, i, f)]
            def fwbw():
                h = fn(qs, ks, vs, is_, fs, chunk_size=128)
                h.backward(dh)
            fwbw()
            torch.cuda.synchronize()
            t_fwbw = triton.testing.do_bench(fwbw, warmup=25, rep=200, grad_to_none=[qs, ks, vs, is_, fs],
                                             return_mode="median")
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"{name} B={B} NH={NH} S={S} {DK}/{DV}: FAILED {type(e).__name__}: {first}", flush=True)
            continue
        row = dict(kernel=name, B=B, NH=NH, S=S, DHQK=DK, DHHV=DV, fw_ms=round(t_fw, 3), fwbw_ms=round(t_fwbw, 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v, i, f, dh
    torch.cuda.empty_cache()
out = os.environ.get("OUT", "/tmp")
json.dump(rows, open(os.path.join(out, "tfla.json"), "w"), indent=1)
