# One table of scripts/gpu_tfla_compare.sh's results: per shape, gate and pass, TFLA's median ms, ours at each
# chunk:rows variant, and the best of ours over TFLA. Usage: compare.py <dir with tfla_*.json and tc_*.json>.
import glob, json, os, re, sys

d = sys.argv[1]
tfla = {}
for f in glob.glob(os.path.join(d, "tfla_*.json")):
    for r in json.load(open(f)):
        gate = "sig" if r["kernel"].endswith("siging") else "exp"
        key = (r["B"], r["NH"], r["S"], r["DHQK"], r["DHHV"], gate)
        tfla[(*key, "fw")] = r["fw_ms"]
        tfla[(*key, "fwbw")] = r["fwbw_ms"]
ours, variants = {}, []
for f in sorted(glob.glob(os.path.join(d, "tc_*.json"))):
    m = re.match(r"tc_(\d+)x(\d+)x(\d+)_(\d+)x(\d+)_L(\d+)_q(\d+)(?:_k(\d+))?\.json", os.path.basename(f))
    if not m:
        continue
    B, NH, S, DK, DV, L, q = map(int, m.groups()[:7])
    v = f"{L}:{q}" + (f":{m.group(8)}" if m.group(8) else "")
    if v not in variants:
        variants.append(v)
    for b in json.load(open(f)).get("benchmarks", []):
        if b.get("aggregate_name") != "median":
            continue
        parts = b["run_name"].split("/")  # OpenCL/tc/<kernel>/<pass>/S=../B=..
        gate = "sig" if parts[2].endswith("siging") else "exp"
        S, B = int(parts[4][2:]), int(parts[5][2:])  # the run's own S=.. and B=..
        ours[(B, NH, S, DK, DV, gate, parts[3], v)] = b["real_time"]
variants.sort(key=lambda v: [int(x) for x in v.split(":")] + [0] * (3 - len(v.split(":"))))
print("| B | NH | S | DHQK/DHHV | gate | pass | TFLA ms | " + " | ".join(f"ours {v} (chunk:rows[:keys])" for v in variants) +
      " | best of ours / TFLA |")
print("|" + "---|" * (8 + len(variants)))
keys = sorted({k[:7] for k in ours} | set(tfla))
for k in keys:
    B, NH, S, DK, DV, gate, p = k
    t = tfla.get(k)
    mine = [ours.get((*k, v)) for v in variants]
    got = [x for x in mine if x is not None]
    ratio = f"{min(got) / t:.2f}" if got and t else "-"
    cells = " | ".join(f"{x:.3f}" if x is not None else "-" for x in mine)
    print(f"| {B} | {NH} | {S} | {DK}/{DV} | {gate} | {p} | {t if t is not None else '-'} | {cells} | {ratio} |")
