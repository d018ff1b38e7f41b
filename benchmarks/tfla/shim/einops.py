# Minimal stand-in for einops.rearrange, enough for mlstm_kernels' chunkwise gates ("b nh (nc l) -> b nh nc l"),
# used only where the GPU image has no einops.
def rearrange(x, pattern, **sizes):
    src, dst = [s.strip() for s in pattern.split("->")]
    if src == "b nh (nc l)" and dst == "b nh nc l":
        return x.reshape(x.shape[0], x.shape[1], sizes["nc"], sizes["l"])
    if src == "b nh nc l" and dst == "b nh (nc l)":
        return x.reshape(x.shape[0], x.shape[1], -1)
    raise NotImplementedError(pattern)
