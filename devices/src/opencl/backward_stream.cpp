// BackwardStream: the backward of a host-resident sequence through one device in pieces (backward_stream.hpp).
#include "mlstm/devices/opencl/backward_stream.hpp"

#include <algorithm>
#include <array>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "internal.hpp"
#include "mlstm/core/env.hpp"
#include "mlstm/core/packed.hpp"
#include "mlstm/core/trace.hpp"
#include "numa.hpp"
#include "tc_program.hpp"

namespace mlstm::opencl {

using detail::KernelObject;
using detail::make_config;
using detail::set_args;
using detail::tc_source_text;
using detail::TcConfig;

namespace {

constexpr int kSlots = 3;  // up(p-1), kernels(p) and down(p+1) in flight at once

// Staging and device buffers of a slot: the inputs q, k, v, dh, i, f and the gradients dq, dk, dv, di, df.
enum In { kQ, kK, kV, kDh, kI, kF, kInputs };
enum Out { kDq, kDk, kDv, kDi, kDf, kOutputs };

void release_event(cl_event& e) noexcept {
  if (e) clReleaseEvent(e);
  e = nullptr;
}

void wait_event(cl_event& e, const std::string& device) {
  if (!e) return;
  const cl_int err = clWaitForEvents(1, &e);
  release_event(e);
  check(err, "clWaitForEvents(backward stream)", device);
}

}  // namespace

struct BackwardStream::Slot {
  Buffer pinned_in, pinned_out;  // page-locked host staging, mapped for the stream's life
  std::byte* host_in = nullptr;
  std::byte* host_out = nullptr;
  std::array<Buffer, kInputs> in;
  std::array<Buffer, kOutputs> out;
  cl_event done = nullptr;  // the slot's last command (its kernels in the states pass, its download afterwards)
  // Pieces spanning sequences: the piece's chunk table and its forward and backward segment tables (host copies kept
  // until the slot's next piece: the uploads read them).
  Buffer ctab, stab, stab_bw;
  std::vector<int> ctab_host, stab_host, stab_bw_host;
};

struct BackwardStream::Impl {
  cl_command_queue up = nullptr, kernels = nullptr, down = nullptr;
  TcConfig cfg;
  Slot slots[kSlots];
  KernelObject gates, fw_states, fw_outputs, bw_prep, bw_states, bw_dq, bw_dk, bw_dv, gate_grads;
  int nparts = 1;  // DHQK tiles of the dq / dk kernels (their qdq / kdk partial sums)
  // Intermediates of the piece that computes (one at a time: the kernel queue is in order).
  Buffer gb, gbi, gpm, gcut, gG, gA, gK, gaw, gub, mst, Cst, nst, h, Nt, sgt, dden, dCst, dnst, qdq, kdk;
  Buffer c_scratch, n_scratch, m_scratch;  // the state leaving a piece when the gradient pass recomputes it
  Buffer dC[2], dN[2], dM;                 // the state gradient entering a piece (ping-pong), dm0
  Buffer dc_last, dn_last;                 // the caller's gradient of the last state, when given
  std::array<Buffer, 3> init;  // packed: the initial state of the sequence whose first piece computes next (C, n, m)
  // The state entering piece j (j = 0 .. pieces; the last one leaves the sequence): C, n, m.
  std::vector<std::array<Buffer, 3>> entering;
  // k, v, i, f of every piece, kept on the device from the states pass for the gradient pass when they fit a
  // quarter of its memory (run_into); empty otherwise (the gradient pass uploads them again).
  std::vector<std::array<PooledBuffer, kInputs>> kept;       // per piece, indexed by In; q and dh stay empty
  std::array<std::size_t, kInputs> in_off{}, in_bytes{};     // at max_piece
  std::array<std::size_t, kOutputs> out_off{}, out_bytes{};  // at max_piece
  // Packed runs: each sequence's initial state (C, n, m) and last-state gradient (dC, dn) in float32, written into
  // `init` / dc_last, dn_last on the kernel queue before the piece that reads them (the queue is in order).
  std::vector<std::array<Tensor, 3>> seq_init;
  std::vector<std::array<Tensor, 2>> seq_dlast;
  // Pieces spanning sequences (Config::max_segments), row k for segment k of the piece that computes: initial
  // states (C, n, m), the forward's last states (C, n, m), the gradients leaving (dC, dn) and entering (dC, dn, dm).
  std::array<Buffer, 3> seg_in, seg_last, seg_d0;
  std::array<Buffer, 2> seg_dlast;
  std::size_t row_bytes[3] = {0, 0, 0};  // one segment's C, n, m (float32)
  // The buffers of the state a piece starts from (its sequence's initial state, or the piece before's leaving
  // state), writing a packed sequence's initial state into `init` first; and whether it has one.
  std::pair<const std::array<Buffer, 3>*, int> enter(const packed::Piece& pc, std::size_t i, bool has_init,
                                                     cl_command_queue q, const std::string& device) {
    if (!pc.first) return {&entering[i], 1};
    if (!has_init) return {&entering[i], 0};
    if (seq_init.empty()) return {&entering[0], 1};  // unpacked: written there at the start
    const auto& from = seq_init[static_cast<std::size_t>(pc.sequence)];
    for (std::size_t t = 0; t < 3; ++t)
      check(clEnqueueWriteBuffer(q, init[t].get(), CL_FALSE, 0, from[t].nbytes(), from[t].bytes(), 0, nullptr, nullptr),
            "clEnqueueWriteBuffer(backward stream: initial state)", device);
    return {&init, 1};
  }
};

BackwardStream::BackwardStream(std::shared_ptr<Device> device, Config config)
    : device_(std::move(device)), config_(config), impl_(std::make_unique<Impl>()) {
  const ScopedTrace trace([&] { return "backward stream opened on " + device_->name(); });
  Device& dev = *device_;
  const std::string& dn = dev.name();
  const Config& c = config_;
  if (c.B <= 0 || c.NH <= 0) throw InvalidArgument("config", "B and NH must be > 0");
  validate_options(c.options);
  if (c.max_piece <= 0) throw InvalidArgument("config.max_piece", "must be a positive multiple of the chunk size");
  ProblemShape p;
  p.B = c.B;
  p.NH = c.NH;
  p.S = c.max_piece;
  p.DHQK = c.DHQK;
  p.DHHV = c.DHHV;
  p.dtype = c.dtype;
  Impl& im = *impl_;
  im.cfg = make_config(dev, c.emulate, p, c.options, false);  // an automatic chunk size resolved (cfg.L)
  if (c.max_segments < 0) throw InvalidArgument("config.max_segments", "must be >= 0 (0: pieces of one sequence)");
  const std::size_t M = static_cast<std::size_t>(c.max_segments);
  if (M > 0) im.cfg.base += " -DPACKED=1";  // chunks restart at every sequence start (tc_common.cl CHUNK_START)
  if (c.max_piece % im.cfg.L != 0)
    throw InvalidArgument("config.max_piece",
                          "must be a positive multiple of the chunk size (" + std::to_string(im.cfg.L) + ")");
  const TcConfig& cfg = im.cfg;
  cl_int err = CL_SUCCESS;
  for (cl_command_queue* q : {&im.up, &im.kernels, &im.down}) {
    *q = clCreateCommandQueue(dev.context(), dev.info().id, 0, &err);
    check(err, "clCreateCommandQueue(backward stream)", dn);
  }
  const std::int64_t K = c.DHQK, V = c.DHHV;
  cl_program gates = dev.program_from_text("tc_gates", tc_source_text("tc_gates"), cfg.gates());
  im.gates = KernelObject{dev.kernel(gates, "tc_fw_gates")};
  im.bw_prep = KernelObject{dev.kernel(gates, "tc_bw_prep")};
  im.gate_grads = KernelObject{dev.kernel(gates, "tc_bw_gate_grads")};
  im.fw_states = KernelObject{
      dev.kernel(dev.program_from_text("tc_states", tc_source_text("tc_states"), cfg.states(0)), "tc_fw_states")};
  im.bw_states = KernelObject{
      dev.kernel(dev.program_from_text("tc_states", tc_source_text("tc_states"), cfg.states(1)), "tc_bw_state_grads")};
  auto chunk = [&](int mode, std::int64_t DA, std::int64_t DOUT, int OT, int DS, const char* name) {
    return KernelObject{dev.kernel(
        dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"), cfg.chunk(mode, DA, DOUT, OT, DS)), name)};
  };
  im.fw_outputs = chunk(0, K, V, cfg.OTf, cfg.DSf, "tc_fw_outputs");
  im.bw_dq = chunk(1, V, K, cfg.OTq, cfg.DSq, "tc_bw_grads_dq");
  im.bw_dk = chunk(2, V, K, cfg.OTq, cfg.DSq, "tc_bw_grads_dk");
  im.bw_dv = chunk(3, K, V, cfg.OTf, cfg.DSf, "tc_bw_grads_dv");
  im.nparts = static_cast<int>(K / cfg.OTq);

  const std::size_t rows = static_cast<std::size_t>(c.B * c.NH), tok = rows * static_cast<std::size_t>(c.max_piece);
  const std::size_t es = dtype_size(c.dtype), kv = static_cast<std::size_t>(K * V);
  const std::size_t NC = static_cast<std::size_t>(c.max_piece / cfg.L) + M;  // packed: a short chunk per segment
  const std::size_t qb = tok * static_cast<std::size_t>(K) * es, vb = tok * static_cast<std::size_t>(V) * es,
                    gb = tok * sizeof(float);
  im.in_bytes = {qb, qb, vb, vb, gb, gb};
  im.out_bytes = {qb, qb, vb, gb, gb};
  std::size_t in_total = 0, out_total = 0;
  for (int j = 0; j < kInputs; ++j) {
    im.in_off[static_cast<std::size_t>(j)] = in_total;
    in_total += im.in_bytes[static_cast<std::size_t>(j)];
  }
  for (int j = 0; j < kOutputs; ++j) {
    im.out_off[static_cast<std::size_t>(j)] = out_total;
    out_total += im.out_bytes[static_cast<std::size_t>(j)];
  }
  auto pinned = [&](std::size_t bytes, Buffer& buf, std::byte*& host) {
    const detail::PinnedNearDevice near(dev.info());  // on the device's NUMA node (numa.hpp)
    cl_mem mem = clCreateBuffer(dev.context(), CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR, bytes, nullptr, &err);
    check(err, "clCreateBuffer(pinned staging)", dn);
    buf = Buffer(mem, bytes);
    void* ptr =
        clEnqueueMapBuffer(im.up, mem, CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, bytes, 0, nullptr, nullptr, &err);
    check(err, "clEnqueueMapBuffer(pinned staging)", dn);
    host = static_cast<std::byte*>(ptr);
  };
  for (Slot& s : im.slots) {
    pinned(in_total, s.pinned_in, s.host_in);
    pinned(out_total, s.pinned_out, s.host_out);
    for (int j = 0; j < kInputs; ++j)
      s.in[static_cast<std::size_t>(j)] = dev.alloc(im.in_bytes[static_cast<std::size_t>(j)]);
    for (int j = 0; j < kOutputs; ++j)
      s.out[static_cast<std::size_t>(j)] = dev.alloc(im.out_bytes[static_cast<std::size_t>(j)]);
    if (M > 0) {
      s.ctab = dev.alloc((2 * NC + 2) * sizeof(int));
      s.stab = dev.alloc(4 * M * sizeof(int));
      s.stab_bw = dev.alloc(4 * M * sizeof(int));
    }
  }
  auto f32 = [&](std::size_t n) { return dev.alloc(std::max<std::size_t>(n, 1) * sizeof(float)); };
  detail::alloc_gate_buffers(dev, im, tok, rows, NC, M);
  im.Cst = dev.alloc(rows * NC * kv * 2);
  im.nst = f32(rows * NC * static_cast<std::size_t>(K));
  im.h = dev.alloc(vb);
  im.Nt = f32(tok);
  im.sgt = f32(tok);
  im.dden = f32(tok);
  im.dCst = dev.alloc(rows * NC * kv * 2);
  im.dnst = f32(rows * NC * static_cast<std::size_t>(K));
  im.qdq = f32(static_cast<std::size_t>(im.nparts) * tok);
  im.kdk = f32(static_cast<std::size_t>(im.nparts) * tok);
  im.c_scratch = f32(rows * kv);
  im.n_scratch = f32(rows * static_cast<std::size_t>(K));
  im.m_scratch = f32(rows);
  for (int j = 0; j < 2; ++j) {
    im.dC[j] = f32(rows * kv);
    im.dN[j] = f32(rows * static_cast<std::size_t>(K));
  }
  im.dM = f32(rows);
  im.dc_last = f32(rows * kv);
  im.dn_last = f32(rows * static_cast<std::size_t>(K));
  if (M > 0) {
    im.row_bytes[0] = rows * kv * sizeof(float);
    im.row_bytes[1] = rows * static_cast<std::size_t>(K) * sizeof(float);
    im.row_bytes[2] = rows * sizeof(float);
    for (std::size_t t = 0; t < 3; ++t) {
      im.seg_in[t] = dev.alloc(M * im.row_bytes[t]);
      im.seg_last[t] = dev.alloc(M * im.row_bytes[t]);
      im.seg_d0[t] = dev.alloc(M * im.row_bytes[t]);
      if (t < 2) im.seg_dlast[t] = dev.alloc(M * im.row_bytes[t]);
    }
  }
}

BackwardStream::~BackwardStream() {
  Impl& im = *impl_;
  for (cl_command_queue q : {im.up, im.kernels, im.down})
    if (q) clFinish(q);
  for (Slot& s : im.slots) {
    release_event(s.done);
    for (auto [buf, host] : {std::pair{&s.pinned_in, s.host_in}, std::pair{&s.pinned_out, s.host_out}})
      if (host) clEnqueueUnmapMemObject(im.up, buf->get(), host, 0, nullptr, nullptr);
  }
  if (im.up) clFinish(im.up);
  for (cl_command_queue q : {im.up, im.kernels, im.down})
    if (q) clReleaseCommandQueue(q);
}

cl_event BackwardStream::upload(Slot& s, const std::vector<std::pair<ConstTensorView, int>>& parts, std::int64_t t0,
                                std::int64_t len, std::int64_t piece) {
  const Impl& im = *impl_;
  const Config& c = config_;
  const std::string& dn = device_->name();
  cl_event last = nullptr;
  for (const auto& [view, index] : parts) {
    const auto j = static_cast<std::size_t>(index);
    const DType dtype = index == kI || index == kF ? DType::f32 : c.dtype;
    const ConstTensorView sliced = sequence_slice(view, t0, t0 + len);
    const std::size_t bytes = static_cast<std::size_t>(sliced.numel()) * dtype_size(dtype);
    const cl_mem target = input_buffer(s, index, piece);
    release_event(last);
    if (const auto rows = detail::pinned_rows(*device_, sliced, dtype)) {
      // In this device's page-locked memory: the DMA reads it where it lies.
      detail::enqueue_rows(im.up, /*write=*/true, target, *rows, nullptr, &last, dn);
      bytes_direct_up_ += bytes;
      device_->note_direct_upload(bytes);
    } else {
      std::byte* host = s.host_in + im.in_off[j];
      copy_elements(sliced, 0, sliced.numel(), dtype, host);
      check(clEnqueueWriteBuffer(im.up, target, CL_FALSE, 0, bytes, host, 0, nullptr, &last),
            "clEnqueueWriteBuffer(backward stream)", dn);
    }
    clFlush(im.up);  // the DMA of this tensor runs while the next one is copied into the staging
    bytes_up_ += bytes;
  }
  return last;
}

cl_mem BackwardStream::input_buffer(const Slot& s, int index, std::int64_t piece) const {
  const Impl& im = *impl_;
  const auto j = static_cast<std::size_t>(index);
  if (!im.kept.empty())
    if (const cl_mem kept = im.kept[static_cast<std::size_t>(piece)][j].get()) return kept;
  return s.in[j].get();
}

namespace {

// The tensor-core kernels' launches on one queue: global (g0, rows), local (l0, 1), the first waiting on `after`.
struct Launcher {
  cl_command_queue queue;
  std::size_t rows;
  const std::string& device;
  void operator()(const KernelObject& k, const char* name, std::size_t g0, std::size_t l0, cl_event* after = nullptr,
                  cl_event* done = nullptr, std::size_t segments = 0) const {
    // segments > 0: a third dimension (the packed state and gate-gradient kernels: one work-group per segment).
    const std::size_t global[3] = {g0, rows, std::max<std::size_t>(segments, 1)}, local[3] = {l0, 1, 1};
    check(clEnqueueNDRangeKernel(queue, k.k, segments > 0 ? 3 : 2, nullptr, global, local, after && *after ? 1 : 0,
                                 after && *after ? after : nullptr, done),
          name, device);
  }
};

}  // namespace

int BackwardStream::packed_piece(Slot& s, const std::vector<Part>& parts, std::size_t piece, bool has_init) {
  Impl& im = *impl_;
  const std::string& dn = device_->name();
  std::vector<std::int64_t> bounds{0};
  for (const Part& g : parts) bounds.push_back(g.t1);
  const detail::PackedChunks tables = detail::packed_chunks(bounds, im.cfg.L);
  s.ctab_host = tables.ctab;
  // Forward: from the piece before's state (a sequence going on), its own initial state, or zero. Backward: from
  // row k of seg_dlast always (zero where the sequence has no last-state gradient), so that the gate gradients'
  // tail reads the same row.
  s.stab_host =
      tables.segment_table([&](int k) { return !parts[static_cast<std::size_t>(k)].starts || has_init ? k : -1; });
  s.stab_bw_host = tables.segment_table([](int k) { return k; });
  const int chunks = tables.chunks();
  const std::pair<const Buffer*, const std::vector<int>*> uploads[3] = {
      {&s.ctab, &s.ctab_host}, {&s.stab, &s.stab_host}, {&s.stab_bw, &s.stab_bw_host}};
  for (const auto& [buf, host] : uploads)
    check(clEnqueueWriteBuffer(im.up, buf->get(), CL_FALSE, 0, host->size() * sizeof(int), host->data(), 0, nullptr,
                               nullptr),
          "clEnqueueWriteBuffer(backward stream tables)", dn);
  // The segments' initial states on the kernel queue (after the kernels of the piece before: the queue is in order).
  for (std::size_t k = 0; k < parts.size(); ++k) {
    const Part& g = parts[k];
    for (std::size_t t = 0; t < 3; ++t) {
      if (!g.starts) {
        check(clEnqueueCopyBuffer(im.kernels, im.entering[piece][t].get(), im.seg_in[t].get(), 0, k * im.row_bytes[t],
                                  im.row_bytes[t], 0, nullptr, nullptr),
              "clEnqueueCopyBuffer(backward stream: carried state)", dn);
      } else if (has_init) {
        const Tensor& from = im.seq_init[static_cast<std::size_t>(g.sequence)][t];
        check(clEnqueueWriteBuffer(im.kernels, im.seg_in[t].get(), CL_FALSE, k * im.row_bytes[t], from.nbytes(),
                                   from.bytes(), 0, nullptr, nullptr),
              "clEnqueueWriteBuffer(backward stream: initial state)", dn);
      }
    }
  }
  return chunks;
}

void BackwardStream::states_pass(const BackwardArgs& a, const std::vector<packed::Piece>& pieces,
                                 const std::vector<std::vector<Part>>& parts) {
  Impl& im = *impl_;
  const Config& c = config_;
  const std::string& dn = device_->name();
  const TcConfig& cfg = im.cfg;
  const Launcher launch{im.kernels, static_cast<std::size_t>(c.B * c.NH), dn};
  const std::size_t states_group = static_cast<std::size_t>(2 * cfg.KT);
  const std::size_t states_global = states_group * static_cast<std::size_t>((c.DHQK / cfg.KT) * (c.DHHV / cfg.VT));
  const ForwardArgs& in = a.inputs;
  for (std::size_t j = 0; j < pieces.size(); ++j) {
    const packed::Piece& pc = pieces[j];
    const ScopedTrace trace([&] { return "backward stream: states of piece " + std::to_string(j); });
    Slot& s = im.slots[j % kSlots];
    wait_event(s.done, dn);
    const auto piece = static_cast<std::int64_t>(j);
    if (!parts.empty()) {
      // Several sequences a piece: their states from their own initial states (or the piece before's), the state of
      // a sequence that goes on carried into the next piece's entering state.
      const std::vector<Part>& ps = parts[j];
      const int NCp = packed_piece(s, ps, j, in.has_initial_state());  // tables before the inputs on the upload queue
      cl_event up = upload(s, {{in.k, kK}, {in.v, kV}, {in.i, kI}, {in.f, kF}}, pc.t0, pc.len(), piece);
      const int Sp = static_cast<int>(pc.len());
      const cl_mem K = input_buffer(s, kK, piece), V = input_buffer(s, kV, piece), I = input_buffer(s, kI, piece),
                   F = input_buffer(s, kF, piece);
      detail::set_args_from(
          im.gates.k, dn,
          set_args(im.gates.k, dn, I, F, im.gb, im.gbi, im.gpm, im.gcut, im.gK, im.gaw, im.gub, im.gG, im.gA, Sp, NCp),
          s.ctab);
      set_args(im.fw_states.k, dn, K, V, im.gaw, im.gK, im.gG, im.gA, im.seg_in[0], im.seg_in[1], im.seg_in[2], 1,
               im.Cst, im.nst, im.mst, im.seg_last[0], im.seg_last[1], im.seg_last[2], Sp, NCp, s.ctab, s.stab);
      try {
        launch(im.gates, "tc_fw_gates", static_cast<std::size_t>(NCp * cfg.L), static_cast<std::size_t>(cfg.L), &up);
        launch(im.fw_states, "tc_fw_states", states_global, states_group, nullptr, &s.done, ps.size());
        if (!ps.back().ends) {
          for (std::size_t t = 0; t < 3; ++t)
            check(clEnqueueCopyBuffer(im.kernels, im.seg_last[t].get(), im.entering[j + 1][t].get(),
                                      (ps.size() - 1) * im.row_bytes[t], 0, im.row_bytes[t], 0, nullptr, nullptr),
                  "clEnqueueCopyBuffer(backward stream: carried state)", dn);
        }
      } catch (...) {
        release_event(up);
        throw;
      }
      release_event(up);
      clFlush(im.kernels);
      continue;
    }
    cl_event up = upload(s, {{in.k, kK}, {in.v, kV}, {in.i, kI}, {in.f, kF}}, pc.t0, pc.len(), piece);
    const int Sp = static_cast<int>(pc.len()), NC = (Sp + cfg.L - 1) / cfg.L;
    const auto [from, has_init] = im.enter(pc, j, in.has_initial_state(), im.kernels, dn);
    const auto& to = im.entering[j + 1];
    const cl_mem K = input_buffer(s, kK, piece), V = input_buffer(s, kV, piece), I = input_buffer(s, kI, piece),
                 F = input_buffer(s, kF, piece);
    set_args(im.gates.k, dn, I, F, im.gb, im.gbi, im.gpm, im.gcut, im.gK, im.gaw, im.gub, im.gG, im.gA, Sp, NC);
    set_args(im.fw_states.k, dn, K, V, im.gaw, im.gK, im.gG, im.gA, (*from)[0], (*from)[1], (*from)[2], has_init,
             im.Cst, im.nst, im.mst, to[0], to[1], to[2], Sp, NC);
    try {
      launch(im.gates, "tc_fw_gates", static_cast<std::size_t>(NC * cfg.L), static_cast<std::size_t>(cfg.L), &up);
      launch(im.fw_states, "tc_fw_states", states_global, states_group, nullptr, &s.done);
    } catch (...) {
      release_event(up);
      throw;
    }
    release_event(up);
    clFlush(im.kernels);
  }
}

void BackwardStream::gradient_pass(const BackwardArgs& a, const std::vector<packed::Piece>& pieces,
                                   const std::vector<std::vector<Part>>& parts, const GradientViews& dest_views,
                                   BackwardResult& states) {
  Impl& im = *impl_;
  const Config& c = config_;
  const std::string& dn = device_->name();
  const TcConfig& cfg = im.cfg;
  const Launcher launch{im.kernels, static_cast<std::size_t>(c.B * c.NH), dn};
  const std::size_t states_group = static_cast<std::size_t>(2 * cfg.KT);
  const std::size_t states_global = states_group * static_cast<std::size_t>((c.DHQK / cfg.KT) * (c.DHHV / cfg.VT));
  const std::size_t group = cfg.chunk_group();
  const std::int64_t K = c.DHQK, V = c.DHHV, n = static_cast<std::int64_t>(pieces.size());
  const ForwardArgs& in = a.inputs;
  const bool user_dlast = !a.dc_last.empty();

  // Results: 4-d views (di and df as (B,NH,S,1)) that each piece's rows go into: downloaded straight there when
  // they lie in this device's page-locked memory, else copied there out of the slot's staging.
  const TensorView dest[kOutputs] = {dest_views.dq, dest_views.dk, dest_views.dv, gate_rows(dest_views.di),
                                     gate_rows(dest_views.df)};
  const std::int64_t width[kOutputs] = {K, K, V, 1, 1};
  const DType out_dtype[kOutputs] = {c.dtype, c.dtype, c.dtype, DType::f32, DType::f32};
  // Which outputs of piece k (k-th in the reverse order) were downloaded straight into dest.
  std::vector<std::array<bool, kOutputs>> direct(static_cast<std::size_t>(n));

  // The consumer copies piece k's gradients (k-th in the reverse order) out of its slot once they are down.
  std::mutex mutex;
  std::condition_variable changed;
  std::int64_t pushed = 0, copied = 0;
  bool stop = false;
  std::vector<cl_event> downloads(static_cast<std::size_t>(n), nullptr);
  std::exception_ptr consumer_error;
  std::thread consumer([&] {
    try {
      for (std::int64_t k = 0; k < n; ++k) {
        {
          std::unique_lock lock(mutex);
          changed.wait(lock, [&] { return pushed > k || stop; });
          if (pushed <= k) return;  // the producer failed
        }
        const std::int64_t j = n - 1 - k, t0 = pieces[static_cast<std::size_t>(j)].t0,
                           len = pieces[static_cast<std::size_t>(j)].len();
        const ScopedTrace trace([&] { return "backward stream: gradients of piece " + std::to_string(j) + " out"; });
        wait_event(downloads[static_cast<std::size_t>(k)], dn);
        const Slot& s = im.slots[k % kSlots];
        for (int o = 0; o < kOutputs; ++o) {
          if (direct[static_cast<std::size_t>(k)][static_cast<std::size_t>(o)]) continue;
          const ConstTensorView piece(s.host_out + im.out_off[static_cast<std::size_t>(o)], out_dtype[o],
                                      {c.B, c.NH, len, width[o]});
          copy_piece_rows(piece, sequence_slice(dest[o], t0, t0 + len));
        }
        std::lock_guard lock(mutex);
        copied = k + 1;
        changed.notify_all();
      }
    } catch (...) {
      std::lock_guard lock(mutex);
      consumer_error = std::current_exception();
      changed.notify_all();
    }
  });

  std::exception_ptr producer_error;
  try {
    for (std::int64_t k = 0; k < n; ++k) {
      const std::int64_t j = n - 1 - k;
      const packed::Piece& pc = pieces[static_cast<std::size_t>(j)];
      const std::int64_t t0 = pc.t0, len = pc.len();
      const ScopedTrace trace([&] { return "backward stream: gradients of piece " + std::to_string(j) + " in"; });
      Slot& s = im.slots[k % kSlots];
      {
        std::unique_lock lock(mutex);  // the slot's last piece of this pass is copied out
        changed.wait(lock, [&] { return copied >= k - (kSlots - 1) || consumer_error; });
        if (consumer_error) break;
      }
      wait_event(s.done, dn);             // its states-pass kernels
      const bool spans = !parts.empty();  // several sequences a piece
      const int NCp = spans ? packed_piece(s, parts[static_cast<std::size_t>(j)], static_cast<std::size_t>(j),
                                           in.has_initial_state())
                            : 0;
      // k, v, i, f are on the device already when the states pass kept them.
      cl_event up =
          im.kept.empty()
              ? upload(s, {{in.q, kQ}, {in.k, kK}, {in.v, kV}, {a.dh, kDh}, {in.i, kI}, {in.f, kF}}, t0, len, j)
              : upload(s, {{in.q, kQ}, {a.dh, kDh}}, t0, len, j);
      const cl_mem Kb = input_buffer(s, kK, j), Vb = input_buffer(s, kV, j), Ib = input_buffer(s, kI, j),
                   Fb = input_buffer(s, kF, j);
      const int Sp = static_cast<int>(len), NC = spans ? NCp : (Sp + cfg.L - 1) / cfg.L;
      // (Pieces of several sequences take their initial states from packed_piece: enter() would write one for
      // nothing.)
      const auto [entered, has_init] =
          spans ? std::pair<const std::array<Buffer, 3>*, int>{&im.entering[static_cast<std::size_t>(j)], 0}
                : im.enter(pc, static_cast<std::size_t>(j), in.has_initial_state(), im.kernels, dn);
      const auto& enter = *entered;
      const int has_dlast = !pc.last || user_dlast ? 1 : 0;
      const auto& leave = im.entering[static_cast<std::size_t>(j + 1)];
      const Buffer& dc_last = !pc.last ? im.dC[(j + 1) % 2] : im.dc_last;
      const Buffer& dn_last = !pc.last ? im.dN[(j + 1) % 2] : im.dn_last;
      const Buffer &dc0 = im.dC[j % 2], &dn0 = im.dN[j % 2];
      if (spans) {
        // Row k of seg_dlast: the gradient leaving segment k (the next piece's carried one for a sequence that goes
        // on, the sequence's own last-state gradient, or zero).
        const std::vector<Part>& ps = parts[static_cast<std::size_t>(j)];
        for (std::size_t k2 = 0; k2 < ps.size(); ++k2) {
          for (std::size_t t = 0; t < 2; ++t) {
            const std::size_t off = k2 * im.row_bytes[t];
            if (!ps[k2].ends) {
              const Buffer& from = t == 0 ? im.dC[(j + 1) % 2] : im.dN[(j + 1) % 2];
              check(clEnqueueCopyBuffer(im.kernels, from.get(), im.seg_dlast[t].get(), 0, off, im.row_bytes[t], 0,
                                        nullptr, nullptr),
                    "clEnqueueCopyBuffer(backward stream: carried gradient)", dn);
            } else if (user_dlast) {
              const Tensor& from = im.seq_dlast[static_cast<std::size_t>(ps[k2].sequence)][t];
              check(clEnqueueWriteBuffer(im.kernels, im.seg_dlast[t].get(), CL_FALSE, off, from.nbytes(), from.bytes(),
                                         0, nullptr, nullptr),
                    "clEnqueueWriteBuffer(backward stream: last-state gradient)", dn);
            } else {
              const float zero = 0.0f;
              check(clEnqueueFillBuffer(im.kernels, im.seg_dlast[t].get(), &zero, sizeof zero, off, im.row_bytes[t], 0,
                                        nullptr, nullptr),
                    "clEnqueueFillBuffer(backward stream: zero gradient)", dn);
            }
          }
        }
        // The packed kernels: the forward recomputed from the segments' initial states (their last states in
        // seg_last), the backward from seg_dlast into seg_d0 (dC, dn entering each segment, and dm0).
        const int init = in.has_initial_state() ? 1 : 0;
        detail::set_args_from(im.gates.k, dn,
                              set_args(im.gates.k, dn, Ib, Fb, im.gb, im.gbi, im.gpm, im.gcut, im.gK, im.gaw, im.gub,
                                       im.gG, im.gA, Sp, NC),
                              s.ctab);
        set_args(im.fw_states.k, dn, Kb, Vb, im.gaw, im.gK, im.gG, im.gA, im.seg_in[0], im.seg_in[1], im.seg_in[2], 1,
                 im.Cst, im.nst, im.mst, im.seg_last[0], im.seg_last[1], im.seg_last[2], Sp, NC, s.ctab, s.stab);
        detail::set_args_from(im.fw_outputs.k, dn,
                              set_args(im.fw_outputs.k, dn, s.in[kQ], Kb, Vb, im.Cst, im.nst, im.mst, im.gb, im.gbi,
                                       im.gpm, im.gcut, im.gK, im.h, im.Nt, im.sgt, Sp, NC),
                              s.ctab);
        set_args(im.bw_prep.k, dn, s.in[kDh], im.h, im.Nt, im.sgt, im.dden, Sp);
        set_args(im.bw_states.k, dn, s.in[kQ], s.in[kDh], im.gub, im.gK, im.gG, im.mst, im.Nt, im.dden, im.seg_dlast[0],
                 im.seg_dlast[1], 1, im.dCst, im.dnst, im.seg_d0[0], im.seg_d0[1], Sp, NC, s.ctab, s.stab_bw);
        detail::set_args_from(im.bw_dq.k, dn,
                              set_args(im.bw_dq.k, dn, s.in[kDh], Vb, Kb, im.Cst, im.nst, im.mst, im.gb, im.gbi, im.gpm,
                                       im.gcut, im.gK, im.Nt, im.dden, s.in[kQ], s.out[kDq], im.qdq, Sp, NC),
                              s.ctab);
        detail::set_args_from(im.bw_dk.k, dn,
                              set_args(im.bw_dk.k, dn, Vb, s.in[kDh], s.in[kQ], im.dCst, im.dnst, im.mst, im.gb, im.gbi,
                                       im.gpm, im.gcut, im.gK, im.Nt, im.dden, Kb, s.out[kDk], im.kdk, Sp, NC),
                              s.ctab);
        detail::set_args_from(im.bw_dv.k, dn,
                              set_args(im.bw_dv.k, dn, Kb, s.in[kQ], s.in[kDh], im.dCst, im.mst, im.gb, im.gbi, im.gpm,
                                       im.gcut, im.gK, im.Nt, s.out[kDv], Sp, NC),
                              s.ctab);
        detail::set_args_from(im.gate_grads.k, dn,
                              set_args(im.gate_grads.k, dn, Ib, Fb, im.qdq, im.kdk, im.nparts, im.seg_dlast[0],
                                       im.seg_dlast[1], im.seg_last[0], im.seg_last[1], 1, im.seg_d0[0], im.seg_d0[1],
                                       im.seg_in[0], im.seg_in[1], init, s.out[kDi], s.out[kDf], im.seg_d0[2], Sp),
                              s.ctab, s.stab);
      } else if (pc.last && user_dlast && !im.seq_dlast.empty()) {
        // A packed sequence's last-state gradient, after the kernels of the pieces before (in order).
        const auto& from = im.seq_dlast[static_cast<std::size_t>(pc.sequence)];
        const Buffer* into[2] = {&im.dc_last, &im.dn_last};
        for (std::size_t t = 0; t < 2; ++t)
          check(clEnqueueWriteBuffer(im.kernels, into[t]->get(), CL_FALSE, 0, from[t].nbytes(), from[t].bytes(), 0,
                                     nullptr, nullptr),
                "clEnqueueWriteBuffer(backward stream: last-state gradient)", dn);
      }
      if (!spans) {
        set_args(im.gates.k, dn, Ib, Fb, im.gb, im.gbi, im.gpm, im.gcut, im.gK, im.gaw, im.gub, im.gG, im.gA, Sp, NC);
        set_args(im.fw_states.k, dn, Kb, Vb, im.gaw, im.gK, im.gG, im.gA, enter[0], enter[1], enter[2], has_init,
                 im.Cst, im.nst, im.mst, im.c_scratch, im.n_scratch, im.m_scratch, Sp, NC);
        set_args(im.fw_outputs.k, dn, s.in[kQ], Kb, Vb, im.Cst, im.nst, im.mst, im.gb, im.gbi, im.gpm, im.gcut, im.gK,
                 im.h, im.Nt, im.sgt, Sp, NC);
        set_args(im.bw_prep.k, dn, s.in[kDh], im.h, im.Nt, im.sgt, im.dden, Sp);
        set_args(im.bw_states.k, dn, s.in[kQ], s.in[kDh], im.gub, im.gK, im.gG, im.mst, im.Nt, im.dden, dc_last,
                 dn_last, has_dlast, im.dCst, im.dnst, dc0, dn0, Sp, NC);
        set_args(im.bw_dq.k, dn, s.in[kDh], Vb, Kb, im.Cst, im.nst, im.mst, im.gb, im.gbi, im.gpm, im.gcut, im.gK,
                 im.Nt, im.dden, s.in[kQ], s.out[kDq], im.qdq, Sp, NC);
        set_args(im.bw_dk.k, dn, Vb, s.in[kDh], s.in[kQ], im.dCst, im.dnst, im.mst, im.gb, im.gbi, im.gpm, im.gcut,
                 im.gK, im.Nt, im.dden, Kb, s.out[kDk], im.kdk, Sp, NC);
        set_args(im.bw_dv.k, dn, Kb, s.in[kQ], s.in[kDh], im.dCst, im.mst, im.gb, im.gbi, im.gpm, im.gcut, im.gK, im.Nt,
                 s.out[kDv], Sp, NC);
        set_args(im.gate_grads.k, dn, Ib, Fb, im.qdq, im.kdk, im.nparts, dc_last, dn_last, leave[0], leave[1],
                 has_dlast, dc0, dn0, enter[0], enter[1], has_init, s.out[kDi], s.out[kDf], im.dM, Sp);
      }
      const std::size_t segments = spans ? parts[static_cast<std::size_t>(j)].size() : 0;
      cl_event computed = nullptr;
      try {
        const std::size_t nc = static_cast<std::size_t>(NC);
        launch(im.gates, "tc_fw_gates", nc * static_cast<std::size_t>(cfg.L), static_cast<std::size_t>(cfg.L), &up);
        launch(im.fw_states, "tc_fw_states", states_global, states_group, nullptr, nullptr, segments);
        launch(im.fw_outputs, "tc_fw_outputs", cfg.chunk_global(nc, V, cfg.OTf), group);
        launch(im.bw_prep, "tc_bw_prep", static_cast<std::size_t>((Sp + 7) / 8) * 256, 256);
        launch(im.bw_states, "tc_bw_state_grads", states_global, states_group, nullptr, nullptr, segments);
        launch(im.bw_dq, "tc_bw_grads_dq", cfg.chunk_global(nc, K, cfg.OTq), group);
        launch(im.bw_dk, "tc_bw_grads_dk", cfg.chunk_global(nc, K, cfg.OTq), group);
        launch(im.bw_dv, "tc_bw_grads_dv", cfg.chunk_global(nc, V, cfg.OTf), group);
        launch(im.gate_grads, "tc_bw_gate_grads", static_cast<std::size_t>(cfg.gate_group),
               static_cast<std::size_t>(cfg.gate_group), nullptr, &computed, segments);
        if (spans) {
          // The gradient entering a sequence that went on from the piece before: carried to that piece. The initial
          // states' gradients of the sequences that start here: read down (the kernel queue is in order).
          const std::vector<Part>& ps = parts[static_cast<std::size_t>(j)];
          if (!ps.front().starts) {
            for (std::size_t t = 0; t < 2; ++t)
              check(clEnqueueCopyBuffer(im.kernels, im.seg_d0[t].get(), (t == 0 ? dc0 : dn0).get(), 0, 0,
                                        im.row_bytes[t], 0, nullptr, nullptr),
                    "clEnqueueCopyBuffer(backward stream: carried gradient)", dn);
          }
          for (std::size_t k2 = 0; k2 < ps.size() && in.has_initial_state(); ++k2) {
            if (!ps[k2].starts) continue;
            const std::int64_t row = ps[k2].sequence;
            Tensor* to[3] = {&states.dc0, &states.dn0, &states.dm0};
            for (std::size_t t = 0; t < 3; ++t) {
              if (t == 2 && c.options.gate != GateVariant::exp) continue;  // zeros (the sigmoid gate has no m)
              check(clEnqueueReadBuffer(im.kernels, im.seg_d0[t].get(), CL_FALSE, k2 * im.row_bytes[t], im.row_bytes[t],
                                        to[t]->bytes() + static_cast<std::size_t>(row) * im.row_bytes[t], 0, nullptr,
                                        nullptr),
                    "clEnqueueReadBuffer(backward stream: initial-state gradient)", dn);
            }
          }
        } else if (pc.first && in.has_initial_state()) {
          // The gradient of the sequence's initial state: in dC, dN and dM until the next piece's kernels (in order).
          const std::int64_t row = pc.sequence;
          const std::pair<const Buffer*, Tensor*> grads[3] = {
              {&dc0, &states.dc0}, {&dn0, &states.dn0}, {&im.dM, &states.dm0}};
          for (const auto& [from, to] : grads) {
            if (to == &states.dm0 && c.options.gate != GateVariant::exp) continue;  // zeros (the sigmoid gate has no m)
            const std::size_t bytes = to->nbytes() / static_cast<std::size_t>(to->dim(0));
            check(clEnqueueReadBuffer(im.kernels, from->get(), CL_FALSE, 0, bytes,
                                      to->bytes() + static_cast<std::size_t>(row) * bytes, 0, nullptr, nullptr),
                  "clEnqueueReadBuffer(backward stream: initial-state gradient)", dn);
          }
        }
        clFlush(im.kernels);
        const std::size_t tok = static_cast<std::size_t>(c.B * c.NH * len);
        const std::size_t bytes[kOutputs] = {tok * static_cast<std::size_t>(K) * dtype_size(c.dtype),
                                             tok * static_cast<std::size_t>(K) * dtype_size(c.dtype),
                                             tok * static_cast<std::size_t>(V) * dtype_size(c.dtype),
                                             tok * sizeof(float), tok * sizeof(float)};
        cl_event down = nullptr;
        for (int o = 0; o < kOutputs; ++o) {
          const auto u = static_cast<std::size_t>(o);
          cl_event* wait = o == 0 ? &computed : nullptr;
          cl_event* done = o == kOutputs - 1 ? &down : nullptr;
          const TensorView to = sequence_slice(dest[o], t0, t0 + len);
          if (const auto rows = detail::pinned_rows(*device_, to, out_dtype[o])) {
            detail::enqueue_rows(im.down, /*write=*/false, s.out[u].get(), *rows, wait, done, dn);
            direct[static_cast<std::size_t>(k)][u] = true;
            bytes_direct_down_ += bytes[o];
            device_->note_direct_download(bytes[o]);
          } else {
            check(clEnqueueReadBuffer(im.down, s.out[u].get(), CL_FALSE, 0, bytes[o], s.host_out + im.out_off[u],
                                      wait ? 1 : 0, wait, done),
                  "clEnqueueReadBuffer(backward stream)", dn);
          }
          bytes_down_ += bytes[o];
        }
        clFlush(im.down);
        release_event(computed);
        release_event(up);
        std::lock_guard lock(mutex);
        downloads[static_cast<std::size_t>(k)] = down;
        pushed = k + 1;
        changed.notify_all();
      } catch (...) {
        release_event(computed);
        release_event(up);
        throw;
      }
    }
  } catch (...) {
    producer_error = std::current_exception();
  }
  {
    std::lock_guard lock(mutex);
    stop = true;
    changed.notify_all();
  }
  consumer.join();
  for (cl_event& e : downloads) release_event(e);
  if (producer_error || consumer_error) {
    for (cl_command_queue q : {im.up, im.kernels, im.down}) clFinish(q);
    if (producer_error) std::rethrow_exception(producer_error);
    std::rethrow_exception(consumer_error);
  }
}

BackwardResult BackwardStream::run(const BackwardArgs& a) { return run_pieces(a, nullptr, {}); }

BackwardResult BackwardStream::run_into(const BackwardArgs& a, const GradientViews* into) {
  return run_pieces(a, into, {});
}

BackwardResult BackwardStream::run_into(const BackwardArgs& a, const GradientViews* into, const StateCheckpoints& kept,
                                        std::int64_t from) {
  return run_pieces(a, into, {&kept, from});
}

BackwardResult BackwardStream::run_pieces(const BackwardArgs& a, const GradientViews* into, KeptStates given) {
  const Config& c = config_;
  MlstmOptions o = c.options;
  const ProblemShape p = validate_backward(a, o);
  if (p.packed() && given.kept) check_not_packed(p, "the OpenCL backward stream from kept states");
  if (into) check_gradient_views(*into, p);
  if (p.B != c.B || p.NH != c.NH || p.DHQK != c.DHQK || p.DHHV != c.DHHV || p.dtype != c.dtype)
    throw InvalidArgument("q", "the backward stream is set up for B=" + std::to_string(c.B) +
                                   ", NH=" + std::to_string(c.NH) + ", head dims " + std::to_string(c.DHQK) + "x" +
                                   std::to_string(c.DHHV) + " of " + std::string(dtype_name(c.dtype)));
  const ScopedTrace trace(
      [&] { return "backward stream of " + std::to_string(p.S) + " tokens on " + device_->name(); });
  Impl& im = *impl_;
  Device& dev = *device_;
  const std::string& dn = dev.name();
  // The pieces: of the row; of a packed row cut anywhere, each holding parts of several sequences (max_segments: the
  // packed kernels); else of every packed sequence in turn (a piece never spans two). A sequence starts from its
  // initial state or zero and its backward from its last-state gradient or zero; the pieces are pipelined.
  const bool spans = p.packed() && c.max_segments > 0;
  const std::vector<packed::Piece> pieces =
      spans ? packed::spanning_pieces(a.inputs, c.max_piece, c.max_segments) : packed::pieces(a.inputs, p, c.max_piece);
  std::vector<std::vector<Part>> parts;
  if (spans) {
    for (const packed::Piece& pc : pieces) parts.push_back(packed::parts(a.inputs, pc));
  }
  const auto n = static_cast<std::int64_t>(pieces.size());
  pieces_ = n;
  // The kept state entering piece j (j = n: leaving the call), on this device or on the host.
  auto kept_at = [&](std::int64_t j) {
    const std::int64_t t = given.from + std::min(p.S, j * c.max_piece);
    const DeviceState* on_device = given.kept->on_device(t);
    if (on_device && on_device->device == device_.get())
      return std::pair<const DeviceState*, const State*>{on_device, nullptr};
    const State* host = given.kept->at(t);
    if (!host || host->C.numel() != c.B * c.NH * c.DHQK * c.DHHV)
      throw Error("BackwardStream: no kept state of this shape at token " + std::to_string(t));
    return std::pair<const DeviceState*, const State*>{nullptr, host};
  };
  const std::size_t rows = static_cast<std::size_t>(c.B * c.NH), K = static_cast<std::size_t>(c.DHQK),
                    kv = K * static_cast<std::size_t>(c.DHHV);
  // The entering states: one set per piece and the state leaving the sequence (buffers kept for later runs).
  while (im.entering.size() < static_cast<std::size_t>(n + 1))
    im.entering.push_back(
        {dev.alloc(rows * kv * sizeof(float)), dev.alloc(rows * K * sizeof(float)), dev.alloc(rows * sizeof(float))});
  // k, v, i, f of every piece stay on the device between the two passes when they fit a quarter of its memory:
  // the gradient pass then moves only q and dh up (4 of the 6 input tensors' bytes saved, about a third of the
  // backward's uploads at 128/128).
  const std::size_t keep_bytes =
      static_cast<std::size_t>(n) * (im.in_bytes[kK] + im.in_bytes[kV] + im.in_bytes[kI] + im.in_bytes[kF]);
  im.kept.clear();
  if (!given.kept && env::one_of("MLSTM_BACKWARD_KEEP", {"on", "off"}) != "off" &&
      keep_bytes <= dev.info().global_memory / 4) {
    im.kept.resize(static_cast<std::size_t>(n));
    for (auto& piece : im.kept) {
      for (const int index : {kK, kV, kI, kF}) {
        const auto j = static_cast<std::size_t>(index);
        piece[j] = dev.acquire(im.in_bytes[j]);
      }
    }
  }
  kept_pieces_ = static_cast<std::int64_t>(im.kept.size());
  auto put = [&](ConstTensorView t, const Buffer& b) {
    const Tensor x = Tensor::copy_of(t, DType::f32);
    check(clEnqueueWriteBuffer(im.kernels, b.get(), CL_TRUE, 0, x.nbytes(), x.bytes(), 0, nullptr, nullptr),
          "clEnqueueWriteBuffer(backward stream)", dn);
  };
  im.seq_init.clear();
  im.seq_dlast.clear();
  if (p.packed()) {
    // Each sequence's initial state and last-state gradient, in float32, for the kernel queue to write before the
    // pieces that read them.
    auto row = [](ConstTensorView t, std::int64_t j) { return Tensor::copy_of(packed::rows(t, j, j + 1), DType::f32); };
    for (std::int64_t j = 0; j < p.N; ++j) {
      if (a.inputs.has_initial_state())
        im.seq_init.push_back({row(a.inputs.c0, j), row(a.inputs.n0, j), row(a.inputs.m0, j)});
      if (!a.dc_last.empty()) im.seq_dlast.push_back({row(a.dc_last, j), row(a.dn_last, j)});
    }
    if (a.inputs.has_initial_state() && !im.init[0].get()) {
      im.init = {dev.alloc(rows * kv * sizeof(float)), dev.alloc(rows * K * sizeof(float)),
                 dev.alloc(rows * sizeof(float))};
    }
  } else {
    if (a.inputs.has_initial_state()) {
      put(a.inputs.c0, im.entering[0][0]);
      put(a.inputs.n0, im.entering[0][1]);
      put(a.inputs.m0, im.entering[0][2]);
    }
    if (!a.dc_last.empty()) {
      put(a.dc_last, im.dc_last);
      put(a.dn_last, im.dn_last);
    }
  }
  // The gradients of the initial states, read down after each sequence's first piece.
  BackwardResult states;
  if (a.inputs.has_initial_state()) {
    states.dc0 = Tensor({p.state_batch(), p.NH, p.DHQK, p.DHHV}, DType::f32);
    states.dn0 = Tensor({p.state_batch(), p.NH, p.DHQK}, DType::f32);
    states.dm0 = Tensor::zeros({p.state_batch(), p.NH}, DType::f32);
  }
  // Where the gradients go: the caller's views, or the result's tensors. The kernels give di and df in float32:
  // other gate dtypes go through float32 tensors, converted at the end.
  BackwardResult out;
  GradientViews dest;
  if (into) {
    dest = *into;
  } else {
    out.dq = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
    out.dk = Tensor({p.B, p.NH, p.S, p.DHQK}, p.dtype);
    out.dv = Tensor({p.B, p.NH, p.S, p.DHHV}, p.dtype);
    dest.dq = out.dq.view();
    dest.dk = out.dk.view();
    dest.dv = out.dv.view();
  }
  if (!into || p.gate_dtype != DType::f32) {
    out.di = Tensor({p.B, p.NH, p.S}, DType::f32);
    out.df = Tensor({p.B, p.NH, p.S}, DType::f32);
    dest.di = out.di.view();
    dest.df = out.df.view();
  }
  try {
    if (given.kept) {
      // The forward's states, on the upload queue ahead of the pieces' inputs (whose events the kernels wait for):
      // copied on the device when it kept them, else uploaded.
      for (std::int64_t j = 1; j <= n; ++j) {
        const auto [on_device, host] = kept_at(j);
        const auto& to = im.entering[static_cast<std::size_t>(j)];
        for (std::size_t t = 0; t < 3; ++t) {
          if (on_device) {
            const auto& b = static_cast<const detail::KeptStateBuffers*>(on_device->handle.get())->state[t];
            check(clEnqueueCopyBuffer(im.up, b.get(), to[t].get(), 0, 0, to[t].bytes(), 0, nullptr, nullptr),
                  "clEnqueueCopyBuffer(backward stream: kept state)", dn);
          } else {
            const Tensor* from[3] = {&host->C, &host->n, &host->m};
            check(clEnqueueWriteBuffer(im.up, to[t].get(), CL_FALSE, 0, from[t]->nbytes(), from[t]->bytes(), 0, nullptr,
                                       nullptr),
                  "clEnqueueWriteBuffer(backward stream: kept state)", dn);
            bytes_up_ += from[t]->nbytes();
          }
        }
      }
      clFlush(im.up);
      dev.note_backward_from_kept_states();
    } else {
      states_pass(a, pieces, parts);
    }
    gradient_pass(a, pieces, parts, dest, states);
    if (a.inputs.has_initial_state()) check(clFinish(im.kernels), "clFinish(backward stream)", dn);
    for (Slot& s : im.slots) release_event(s.done);
  } catch (...) {
    for (cl_command_queue q : {im.up, im.kernels, im.down}) clFinish(q);
    for (Slot& s : im.slots) release_event(s.done);
    im.kept.clear();
    im.seq_init.clear();
    im.seq_dlast.clear();
    throw;
  }
  im.kept.clear();  // back to the device's pool (every download, hence every kernel, is done)
  im.seq_init.clear();
  im.seq_dlast.clear();
  if (into && p.gate_dtype != DType::f32) {
    for (auto [from, to] : {std::pair{&out.di, into->di}, std::pair{&out.df, into->df}}) {
      write_gradient(from->view(), to);
      *from = Tensor();
    }
  } else if (!into && p.gate_dtype != DType::f32) {
    out.di = out.di.to(p.gate_dtype);
    out.df = out.df.to(p.gate_dtype);
  }
  if (a.inputs.has_initial_state()) {
    out.dc0 = std::move(states.dc0);
    out.dn0 = std::move(states.dn0);
    out.dm0 = std::move(states.dm0);
  }
  return out;
}

}  // namespace mlstm::opencl
