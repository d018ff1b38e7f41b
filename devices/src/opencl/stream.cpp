// DeviceStream: host streaming through one device with the state kept there (stream.hpp).
#include "mlstm/devices/opencl/stream.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <deque>
#include <future>
#include <type_traits>

#include "internal.hpp"
#include "mlstm/core/trace.hpp"
#include "numa.hpp"
#include "tc_program.hpp"

namespace mlstm::opencl {

using detail::KernelObject;
using detail::make_config;
using detail::set_args;
using detail::set_args_from;
using detail::tc_source_text;
using detail::TcConfig;

namespace {

constexpr int kStreamSlots = 3;  // up(p+1), kernels(p) and down(p-1) in flight at once

void release_event(cl_event& e) {
  if (e) clReleaseEvent(e);
  e = nullptr;
}

// Copies `src` (any strides, any dtype) into the contiguous `dst` (its dtype).
void copy_into(ConstTensorView src, TensorView dst) { copy_elements(src, 0, src.numel(), dst.dtype(), dst.bytes()); }

}  // namespace

struct DeviceStream::Slot {
  // The host staging the slot's pieces use: host_in (q, k, v, i, f), host_out (h) and host_last (packed last
  // states) point into `ordinary` until the slot turns page-locked (adopt_staging), then into the page-locked
  // buffers the staging thread mapped (locked_*, mapped for the stream's life).
  Buffer pinned_in, pinned_out;
  std::byte* host_in = nullptr;
  std::byte* host_out = nullptr;
  std::byte *locked_in = nullptr, *locked_out = nullptr, *locked_last = nullptr;
  std::unique_ptr<std::byte[]> ordinary;  // allocated when a piece first needs it (next_piece)
  bool page_locked = false;
  // An ordinary-memory piece's h stays on the device until it is taken or its slot is reused: reading it into
  // ordinary memory at submit would hold the submitting thread until the piece is computed (NVIDIA's driver).
  bool deferred_h = false;
  Buffer q, k, v, i, f, h;  // device copies of one piece
  Buffer state_copy[3];     // C, n, m leaving the piece, for state_after_next_piece_into() (lazily)
  // Packed streams (Config::max_segments): the piece's chunk and segment tables (their host copies stay until the
  // slot is reused, the uploads read them) and the states leaving its segments (row k: segment k).
  Buffer ctab, stab, last[3];
  std::vector<int> ctab_host, stab_host;
  // ... and their page-locked landing place: the ended sequences' states come down there behind h (one read per
  // part, asynchronous), and go into the caller's views (last_to: offset in host_last, view) once the piece is down.
  Buffer pinned_last;
  std::byte* host_last = nullptr;
  std::vector<std::pair<std::size_t, TensorView>> last_to;
  KernelObject gates, states, outputs;  // bound to this slot's buffers
  cl_event up = nullptr, computed = nullptr, down = nullptr;
  std::uint64_t ticket = 0;
  std::int64_t len = 0;
  TensorView direct_out;                            // h downloaded straight there (push's h_dest), else empty
  bool busy = false, taken = true, taking = false;  // guarded by DeviceStream::mutex_
};

struct DeviceStream::Impl {
  cl_command_queue up = nullptr, kernels = nullptr, down = nullptr;
  TcConfig cfg;
  Slot slots[kStreamSlots];
  cl_program gates = nullptr, states = nullptr, outputs = nullptr;  // the device's (cached there)
  // The slots' page-locked staging, set up on a thread of its own (staging_thread, below), slot after slot
  // (page-locking does not overlap with itself on the H200 host): staged[j] is ready when slot j's is, or holds its
  // error.
  std::atomic<bool> stop_staging{false};  // the destructor's: a stream that ends early page-locks no more slots
  std::promise<void> staging_done[kStreamSlots];
  std::future<void> staged[kStreamSlots];
  cl_command_queue reads = nullptr;  // deferred h reads (read_deferred_h), apart from the download queue's order
  Buffer gb, gbi, gpm, gcut, gG, gA, gK, gaw, gub, mst, Cst, nst, Nt,
      sgt;                  // intermediates: one piece computes at a time
  Buffer C[2], n[2], m[2];  // the state, ping-pong between pieces
  int state = 0;            // index of the current state
  bool has_state = false;
  bool keep_states = false;                       // keep_states(): the state leaving each piece, copied
  std::vector<std::array<PooledBuffer, 3>> kept;  // C, n, m after each piece since keep_states(true)
  // start_sequence()'s initial states, each until its write to the device has completed (dropped at the next
  // start_sequence() or finish(): a stream of many sequences holds only the few still in flight).
  struct HeldState {
    cl_event written = nullptr;
    Tensor host;
  };
  std::deque<HeldState> held;
  void drop_held(bool all) {
    while (!held.empty()) {
      cl_int status = CL_COMPLETE;
      if (!all && held.front().written &&
          (clGetEventInfo(held.front().written, CL_EVENT_COMMAND_EXECUTION_STATUS, sizeof status, &status, nullptr) !=
               CL_SUCCESS ||
           status > CL_COMPLETE))  // CL_COMPLETE is 0; queued, submitted and running are positive
        break;
      release_event(held.front().written);
      held.pop_front();
    }
  }
  std::array<TensorView, 3> state_out;  // state_after_next_piece_into(): C, n, m; empty when none
  // Packed streams: the next piece's segments (set_segments) with their initial states' float32 copies, and the
  // initial states the packed states kernel reads (row k: segment k; the carried state copied in for a segment
  // that goes on).
  std::vector<Segment> segments;
  std::vector<std::array<Tensor, 3>> segment_initial;
  Buffer in[3];
  std::int64_t NC_max = 0;
  std::size_t q_bytes = 0, v_bytes = 0, g_bytes = 0;  // per-tensor staging sizes at max_piece
  std::size_t last_bytes = 0;                         // packed: the last states of max_segments sequences
  // Last, so destroyed first: its future waits for the thread, which uses the slots and the promises above.
  std::future<void> staging_thread;
};

DeviceStream::DeviceStream(std::shared_ptr<Device> device, Config config, ConstTensorView c0, ConstTensorView n0,
                           ConstTensorView m0)
    : device_(std::move(device)), config_(config), impl_(std::make_unique<Impl>()) {
  const ScopedTrace trace([&] { return "stream opened on " + device_->name(); });
  Device& dev = *device_;
  dev.note_stream_opened(true);
  const std::string& dn = dev.name();
  const Config& c = config_;
  if (c.B <= 0 || c.NH <= 0) throw InvalidArgument("config", "B and NH must be > 0");
  if (c.max_piece <= 0) throw InvalidArgument("config.max_piece", "must be > 0");
  if (c.max_segments < 0) throw InvalidArgument("config.max_segments", "must be >= 0 (0: not packed)");
  validate_options(c.options);
  ProblemShape p;
  p.B = c.B;
  p.NH = c.NH;
  p.S = c.max_piece;
  p.DHQK = c.DHQK;
  p.DHHV = c.DHHV;
  p.dtype = c.dtype;
  Impl& im = *impl_;
  im.cfg = make_config(dev, c.emulate, p, c.options, false);
  const std::size_t M = static_cast<std::size_t>(c.max_segments);
  if (M > 0) im.cfg.base += " -DPACKED=1";  // chunks restart at every sequence start (tc_common.cl CHUNK_START)
  const std::size_t rows = static_cast<std::size_t>(c.B * c.NH), maxS = static_cast<std::size_t>(c.max_piece);
  const std::size_t es = dtype_size(c.dtype), tok = rows * maxS;
  // Packed, a piece has a short chunk at most at the end of every segment.
  const std::size_t NC = (maxS + static_cast<std::size_t>(im.cfg.L) - 1) / static_cast<std::size_t>(im.cfg.L) + M;
  im.NC_max = static_cast<std::int64_t>(NC);
  const std::size_t K = static_cast<std::size_t>(c.DHQK), V = static_cast<std::size_t>(c.DHHV);
  im.q_bytes = tok * K * es;
  im.v_bytes = tok * V * es;
  im.g_bytes = tok * sizeof(float);
  im.last_bytes = M * rows * (K * V + K + 1) * sizeof(float);
  cl_int err = CL_SUCCESS;
  for (cl_command_queue* q : {&im.up, &im.kernels, &im.down, &im.reads}) {
    *q = clCreateCommandQueue(dev.context(), dev.info().id, CL_QUEUE_PROFILING_ENABLE, &err);
    check(err, "clCreateCommandQueue(stream)", dn);
  }
  if (c.staging != Config::Staging::pageable) {
    // Page-locking is most of a slot's set-up; the first pieces need not wait for it (Config::staging). The
    // destructor (or a failing constructor, below) waits for this thread, which uses the slots.
    for (int j = 0; j < kStreamSlots; ++j) im.staged[j] = im.staging_done[j].get_future();
    im.staging_thread = std::async(std::launch::async, [this] {
      Impl& st = *impl_;
      int j = 0;
      try {
        cl_int e = CL_SUCCESS;
        const std::unique_ptr<std::remove_pointer_t<cl_command_queue>, decltype(&clReleaseCommandQueue)> q(
            clCreateCommandQueue(device_->context(), device_->info().id, 0, &e), &clReleaseCommandQueue);
        check(e, "clCreateCommandQueue(stream staging)", device_->name());
        // Stopped early (stop_staging: the destructor), the slots left are never waited for.
        for (; j < kStreamSlots && !st.stop_staging.load(); ++j) {
          const ScopedTrace locked([&] { return "stream slot " + std::to_string(j) + " page-locked"; });
          page_lock(st.slots[j], q.get());
          st.staging_done[j].set_value();
        }
      } catch (...) {
        for (; j < kStreamSlots; ++j) st.staging_done[j].set_exception(std::current_exception());
      }
    });
  }
  // The programs, the slots' device buffers and the intermediates while the staging thread page-locks slot 0 (no
  // set-up of ours comes before it). A failure stops that thread before the error leaves.
  try {
    im.gates = dev.program_from_text("tc_gates", tc_source_text("tc_gates"), im.cfg.gates());
    im.states = dev.program_from_text("tc_states", tc_source_text("tc_states"), im.cfg.states(0));
    im.outputs = dev.program_from_text("tc_chunk", tc_source_text("tc_chunk"),
                                       im.cfg.chunk(0, c.DHQK, c.DHHV, im.cfg.OTf, im.cfg.DSf));
    auto f32 = [&](std::size_t n) { return dev.alloc(std::max<std::size_t>(n, 1) * sizeof(float)); };
    for (Slot& s : im.slots) set_up(s);
    detail::alloc_gate_buffers(dev, im, tok, rows, NC, M);
    im.Nt = f32(tok);
    im.sgt = f32(tok);
    im.Cst = dev.alloc(rows * NC * K * V * es);
    im.nst = f32(rows * NC * K);
    for (int j = 0; j < 2; ++j) {
      im.C[j] = f32(rows * K * V);
      im.n[j] = f32(rows * K);
      im.m[j] = f32(rows);
    }
    if (M > 0) {
      im.in[0] = f32(M * rows * K * V);
      im.in[1] = f32(M * rows * K);
      im.in[2] = f32(M * rows);
    }
    load_state(c0, n0, m0);
  } catch (...) {
    im.stop_staging = true;
    if (im.staging_thread.valid()) im.staging_thread.wait();
    for (cl_command_queue q : {im.up, im.kernels, im.down, im.reads}) clReleaseCommandQueue(q);
    throw;
  }
}

void DeviceStream::page_lock(Slot& s, cl_command_queue queue) {
  Device& dev = *device_;
  const std::string& dn = dev.name();
  const Impl& im = *impl_;
  auto pinned = [&](std::size_t bytes, Buffer& buf, std::byte*& host) {
    const detail::PinnedNearDevice near(dev.info());  // on the device's NUMA node (numa.hpp)
    cl_int err = CL_SUCCESS;
    cl_mem mem = clCreateBuffer(dev.context(), CL_MEM_READ_WRITE | CL_MEM_ALLOC_HOST_PTR, bytes, nullptr, &err);
    check(err, "clCreateBuffer(pinned staging)", dn);
    buf = Buffer(mem, bytes);
    void* ptr =
        clEnqueueMapBuffer(queue, mem, CL_TRUE, CL_MAP_READ | CL_MAP_WRITE, 0, bytes, 0, nullptr, nullptr, &err);
    check(err, "clEnqueueMapBuffer(pinned staging)", dn);
    host = static_cast<std::byte*>(ptr);
  };
  pinned(2 * im.q_bytes + im.v_bytes + 2 * im.g_bytes, s.pinned_in, s.locked_in);
  pinned(im.v_bytes, s.pinned_out, s.locked_out);
  if (config_.max_segments > 0) pinned(im.last_bytes, s.pinned_last, s.locked_last);
}

void DeviceStream::set_up(Slot& s) {
  Device& dev = *device_;
  const Impl& im = *impl_;
  s.q = dev.alloc(im.q_bytes);
  s.k = dev.alloc(im.q_bytes);
  s.v = dev.alloc(im.v_bytes);
  s.i = dev.alloc(im.g_bytes);
  s.f = dev.alloc(im.g_bytes);
  s.h = dev.alloc(im.v_bytes);
  if (config_.max_segments > 0) {
    const std::size_t M = static_cast<std::size_t>(config_.max_segments);
    const std::size_t rows = static_cast<std::size_t>(config_.B * config_.NH);
    const std::size_t K = static_cast<std::size_t>(config_.DHQK), V = static_cast<std::size_t>(config_.DHHV);
    s.ctab = dev.alloc((2 * static_cast<std::size_t>(im.NC_max) + 2) * sizeof(int));
    s.stab = dev.alloc(4 * M * sizeof(int));
    s.last[0] = dev.alloc(M * rows * K * V * sizeof(float));
    s.last[1] = dev.alloc(M * rows * K * sizeof(float));
    s.last[2] = dev.alloc(M * rows * sizeof(float));
  }
  s.gates = KernelObject{dev.kernel(im.gates, "tc_fw_gates")};
  s.states = KernelObject{dev.kernel(im.states, "tc_fw_states")};
  s.outputs = KernelObject{dev.kernel(im.outputs, "tc_fw_outputs")};
}

void DeviceStream::adopt_staging(Slot& s, int j, bool wait) {
  Impl& im = *impl_;
  if (s.page_locked || !im.staged[j].valid()) return;  // done, or Staging::pageable
  if (!wait && im.staged[j].wait_for(std::chrono::seconds(0)) != std::future_status::ready) return;
  try {
    im.staged[j].get();
  } catch (const std::exception& e) {
    // Page-locked memory may run out; ordinary memory still carries the stream (slower), unless it was asked for.
    if (config_.staging == Config::Staging::page_locked) throw;
    spdlog::warn("mlstm-flow: {}: the stream's slot {} stays in ordinary memory: {}", device_->name(), j, e.what());
    return;
  }
  s.host_in = s.locked_in;
  s.host_out = s.locked_out;
  s.host_last = s.locked_last;
  s.ordinary.reset();
  s.page_locked = true;
}

void DeviceStream::read_deferred_h(Slot& s, TensorView to) {
  const Config& c = config_;
  const Shape shape{c.B, c.NH, s.len, c.DHHV};
  check_output_rows(to, shape, c.dtype, "out");
  const std::optional<detail::HostRows> rows = detail::host_rows(to, c.dtype);
  if (!rows) throw InvalidArgument("out", "its rows cannot be read in one copy");  // check_output_rows took them
  cl_event done = nullptr;
  detail::enqueue_rows(impl_->reads, /*write=*/false, s.h.get(), *rows, &s.down, &done, device_->name());
  const cl_int waited = clWaitForEvents(1, &done);
  release_event(done);
  check(waited, "clWaitForEvents(stream h read)", device_->name());
  s.deferred_h = false;
}

void DeviceStream::load_state(ConstTensorView c0, ConstTensorView n0, ConstTensorView m0) {
  Impl& im = *impl_;
  const Config& c = config_;
  im.state = 0;
  im.has_state = false;
  if (c0.empty() && n0.empty() && m0.empty()) return;
  if (c0.empty() || n0.empty() || m0.empty()) throw InvalidArgument("c0", "c0, n0 and m0 must be given together");
  auto put = [&](ConstTensorView t, const Buffer& b, const char* name, const Shape& want) {
    if (t.shape() != want)
      throw InvalidArgument(name, "expected shape " + shape_to_string(want) + ", got " + shape_to_string(t.shape()));
    const Tensor x = Tensor::copy_of(t, DType::f32);
    check(clEnqueueWriteBuffer(im.kernels, b.get(), CL_TRUE, 0, x.nbytes(), x.bytes(), 0, nullptr, nullptr),
          "clEnqueueWriteBuffer(initial state)", device_->name());
  };
  put(c0, im.C[0], "c0", {c.B, c.NH, c.DHQK, c.DHHV});
  put(n0, im.n[0], "n0", {c.B, c.NH, c.DHQK});
  put(m0, im.m[0], "m0", {c.B, c.NH});
  im.has_state = true;
}

void DeviceStream::restart(ConstTensorView c0, ConstTensorView n0, ConstTensorView m0) {
  finish();
  {
    std::lock_guard lock(mutex_);
    for (Slot& s : impl_->slots) {
      if (s.taking) throw Error("DeviceStream::restart: a take() is still running");
      release_event(s.up);
      release_event(s.computed);
      release_event(s.down);
      s.busy = false;
      s.taken = true;
      s.last_to.clear();  // views of a piece never taken
    }
    finished_.clear();
  }
  pending_len_ = 0;
  tokens_ = 0;
  next_ticket_ = 0;
  impl_->keep_states = false;
  impl_->kept.clear();
  impl_->state_out = {};
  impl_->segments.clear();  // segments set for a piece never submitted describe nothing after a restart
  impl_->segment_initial.clear();
  load_state(c0, n0, m0);
  device_->note_stream_opened(false);
}

DeviceStream::~DeviceStream() {
  if (!impl_) return;
  Impl& im = *impl_;
  im.stop_staging = true;
  if (im.staging_thread.valid()) im.staging_thread.wait();
  for (cl_command_queue q : {im.up, im.kernels, im.down, im.reads})
    if (q) clFinish(q);
  im.drop_held(true);
  for (Slot& s : im.slots) {
    release_event(s.up);
    release_event(s.computed);
    release_event(s.down);
    if (s.locked_in) clEnqueueUnmapMemObject(im.up, s.pinned_in.get(), s.locked_in, 0, nullptr, nullptr);
    if (s.locked_out) clEnqueueUnmapMemObject(im.up, s.pinned_out.get(), s.locked_out, 0, nullptr, nullptr);
    if (s.locked_last) clEnqueueUnmapMemObject(im.up, s.pinned_last.get(), s.locked_last, 0, nullptr, nullptr);
  }
  for (cl_command_queue q : {im.up, im.kernels, im.down, im.reads}) {
    if (!q) continue;
    clFinish(q);
    clReleaseCommandQueue(q);
  }
}

DeviceStream::Slot& DeviceStream::slot_of(std::uint64_t ticket) { return impl_->slots[ticket % kStreamSlots]; }

// The last states of the sequences that ended in slot s's piece, from its page-locked staging into the caller's
// views (once its download has completed; before take() returns or the slot is reused, whichever comes first).
void DeviceStream::deliver_last_states(Slot& s) {
  for (const auto& [offset, to] : s.last_to) std::memcpy(to.bytes(), s.host_last + offset, to.nbytes());
  s.last_to.clear();
}

void DeviceStream::retire(Slot& s) {
  std::unique_lock lock(mutex_);
  slot_free_.wait(lock, [&] { return !s.taking; });
  if (!s.busy) return;
  cl_event down = s.down;
  clRetainEvent(down);
  lock.unlock();
  const cl_int waited = clWaitForEvents(1, &down);
  clReleaseEvent(down);
  check(waited, "clWaitForEvents(stream download)", device_->name());
  lock.lock();
  slot_free_.wait(lock, [&] { return !s.taking; });  // a take() that started meanwhile finishes first
  deliver_last_states(s);
  if (!s.taken && !s.direct_out.empty()) {
    if (s.deferred_h) read_deferred_h(s, s.direct_out);
    finished_.emplace(s.ticket, Finished{Tensor(), s.direct_out});
  } else if (!s.taken) {
    Tensor h({config_.B, config_.NH, s.len, config_.DHHV}, config_.dtype);
    if (s.deferred_h) {
      read_deferred_h(s, h.view());
    } else {
      copy_rows(h.bytes(), 0, s.host_out, 0, 1, h.nbytes());
    }
    finished_.emplace(s.ticket, Finished{std::move(h), {}});
  }
  s.deferred_h = false;
  release_event(s.up);
  release_event(s.computed);
  release_event(s.down);
  s.busy = false;
  s.taken = true;
}

DeviceStream::HostPiece DeviceStream::next_piece(std::int64_t len) {
  if (len < 1 || len > config_.max_piece)
    throw InvalidArgument(
        "len", "a piece must have 1.." + std::to_string(config_.max_piece) + " tokens, got " + std::to_string(len));
  Slot& s = slot_of(next_ticket_);
  retire(s);
  adopt_staging(s, static_cast<int>(next_ticket_ % kStreamSlots),
                /*wait=*/config_.staging == Config::Staging::page_locked);
  const Impl& im = *impl_;
  if (!s.page_locked && !s.ordinary) {
    // Not touched before it is used (push() uploads most inputs from where they lie): it costs address space only.
    const std::size_t in = 2 * im.q_bytes + im.v_bytes + 2 * im.g_bytes;
    s.ordinary = std::make_unique_for_overwrite<std::byte[]>(in + im.v_bytes + im.last_bytes);
    s.host_in = s.ordinary.get();
    s.host_out = s.host_in + in;
    s.host_last = s.host_out + im.v_bytes;
  }
  const Config& c = config_;
  const std::size_t es = dtype_size(c.dtype);
  std::byte* base = s.host_in;
  HostPiece p;
  p.len = len;
  p.q = TensorView(base, c.dtype, {c.B, c.NH, len, c.DHQK});
  p.k = TensorView(base + im.q_bytes, c.dtype, {c.B, c.NH, len, c.DHQK});
  p.v = TensorView(base + 2 * im.q_bytes, c.dtype, {c.B, c.NH, len, c.DHHV});
  p.i = TensorView(base + 2 * im.q_bytes + im.v_bytes, DType::f32, {c.B, c.NH, len});
  p.f = TensorView(base + 2 * im.q_bytes + im.v_bytes + im.g_bytes, DType::f32, {c.B, c.NH, len});
  (void)es;
  pending_len_ = len;
  return p;
}

std::uint64_t DeviceStream::submit() {
  if (pending_len_ == 0) throw Error("DeviceStream::submit: call next_piece() first");
  return enqueue_piece(nullptr);
}

std::uint64_t DeviceStream::enqueue_piece(const detail::HostRows* direct, const detail::HostRows* out,
                                          TensorView out_view) {
  Impl& im = *impl_;
  const Config& c = config_;
  const std::string& dn = device_->name();
  if (c.max_segments > 0) {  // before the piece takes a ticket
    if (im.segments.empty())
      throw Error("DeviceStream: a stream of packed sequences needs set_segments() before every piece");
    if (im.segments.back().t1 != pending_len_) {
      const std::int64_t covered = im.segments.back().t1;
      im.segments.clear();
      im.segment_initial.clear();
      throw InvalidArgument("segments", "the segments cover " + std::to_string(covered) + " tokens, the piece has " +
                                            std::to_string(pending_len_));
    }
  }
  const std::uint64_t ticket = next_ticket_++;
  Slot& s = slot_of(ticket);
  const std::int64_t len = pending_len_;
  pending_len_ = 0;
  const std::size_t rows = static_cast<std::size_t>(c.B * c.NH), L = static_cast<std::size_t>(len);
  const std::size_t es = dtype_size(c.dtype);
  const std::size_t qb = rows * L * static_cast<std::size_t>(c.DHQK) * es;
  const std::size_t vb = rows * L * static_cast<std::size_t>(c.DHHV) * es, gbytes = rows * L * sizeof(float);
  cl_event up = nullptr, computed = nullptr, down = nullptr, state_copied = nullptr;
  std::array<TensorView, 3> state_out;  // state_after_next_piece_into()'s views, when this piece fills them
  const bool packed = c.max_segments > 0;
  std::vector<Segment> segments;
  std::vector<std::array<Tensor, 3>> segment_initial;
  int packed_chunks = 0;
  if (packed) {
    segments = std::move(im.segments);
    segment_initial = std::move(im.segment_initial);
    im.segments.clear();
    im.segment_initial.clear();
    packed_chunks = packed_tables(s, segments, segment_initial);
    // Before the inputs on the (in-order) upload queue: the kernels wait for the last input's upload.
    check(clEnqueueWriteBuffer(im.up, s.ctab.get(), CL_FALSE, 0, s.ctab_host.size() * sizeof(int), s.ctab_host.data(),
                               0, nullptr, nullptr),
          "clEnqueueWriteBuffer(stream chunk table)", dn);
    check(clEnqueueWriteBuffer(im.up, s.stab.get(), CL_FALSE, 0, s.stab_host.size() * sizeof(int), s.stab_host.data(),
                               0, nullptr, nullptr),
          "clEnqueueWriteBuffer(stream segment table)", dn);
  }
  // Uploads (non-blocking; from page-locked memory a DMA at full PCIe speed).
  const std::pair<const Buffer*, std::pair<std::size_t, std::size_t>> parts[] = {
      {&s.q, {0, qb}},
      {&s.k, {im.q_bytes, qb}},
      {&s.v, {2 * im.q_bytes, vb}},
      {&s.i, {2 * im.q_bytes + im.v_bytes, gbytes}},
      {&s.f, {2 * im.q_bytes + im.v_bytes + im.g_bytes, gbytes}}};
  for (std::size_t j = 0; j < 5; ++j) {
    const auto& [buf, range] = parts[j];
    cl_event* ev = j == 4 ? &up : nullptr;
    const detail::HostRows* from = direct && direct[j].data ? &direct[j] : nullptr;
    if (!from) {
      check(clEnqueueWriteBuffer(im.up, buf->get(), CL_FALSE, 0, range.second, s.host_in + range.first, 0, nullptr, ev),
            "clEnqueueWriteBuffer(stream upload)", dn);
    } else {
      detail::enqueue_rows(im.up, /*write=*/true, buf->get(), *from, nullptr, ev, dn);
    }
    bytes_up_ += range.second;
  }
  clFlush(im.up);
  cl_event after_compute = up;
  std::vector<std::size_t> ended;  // packed: the segments whose last states come down behind h
  if (c.compute) {
    const int S = static_cast<int>(len), NC = packed ? packed_chunks : (S + im.cfg.L - 1) / im.cfg.L,
              has_init = im.has_state || packed ? 1 : 0;
    const int from = im.state, to = 1 - im.state;
    const cl_uint after_gates =
        set_args(s.gates.k, dn, s.i, s.f, im.gb, im.gbi, im.gpm, im.gcut, im.gK, im.gaw, im.gub, im.gG, im.gA, S, NC);
    const cl_uint after_outputs = set_args(s.outputs.k, dn, s.q, s.k, s.v, im.Cst, im.nst, im.mst, im.gb, im.gbi,
                                           im.gpm, im.gcut, im.gK, s.h, im.Nt, im.sgt, S, NC);
    if (packed) {
      // The chunk table after each kernel's own arguments; the states kernel reads every segment's initial state
      // from im.in (row k: segment k) and writes its last state to the slot's row k.
      set_args_from(s.gates.k, dn, after_gates, s.ctab);
      set_args_from(s.outputs.k, dn, after_outputs, s.ctab);
      set_args(s.states.k, dn, s.k, s.v, im.gaw, im.gK, im.gG, im.gA, im.in[0], im.in[1], im.in[2], has_init, im.Cst,
               im.nst, im.mst, s.last[0], s.last[1], s.last[2], S, NC, s.ctab, s.stab);
      write_segment_initial_states(segments, segment_initial);
    } else {
      set_args(s.states.k, dn, s.k, s.v, im.gaw, im.gK, im.gG, im.gA, im.C[from], im.n[from], im.m[from], has_init,
               im.Cst, im.nst, im.mst, im.C[to], im.n[to], im.m[to], S, NC);
    }
    const std::size_t rws = rows, KT = static_cast<std::size_t>(im.cfg.KT);
    const std::size_t sg = 2 * KT * static_cast<std::size_t>((c.DHQK / im.cfg.KT) * (c.DHHV / im.cfg.VT));
    const std::size_t g0[3] = {static_cast<std::size_t>(NC) * static_cast<std::size_t>(im.cfg.L), sg,
                               im.cfg.chunk_global(static_cast<std::size_t>(NC), c.DHHV, im.cfg.OTf)};
    const std::size_t l0[3] = {static_cast<std::size_t>(im.cfg.L), 2 * KT, im.cfg.chunk_group()};
    const cl_kernel ks[3] = {s.gates.k, s.states.k, s.outputs.k};
    for (int j = 0; j < 3; ++j) {
      // The packed states kernel: a work-group walk per segment (third dimension).
      const cl_uint dims = packed && j == 1 ? 3 : 2;
      const std::size_t global[3] = {g0[j], rws, packed ? segments.size() : 1}, local[3] = {l0[j], 1, 1};
      check(clEnqueueNDRangeKernel(im.kernels, ks[j], dims, nullptr, global, local, j == 0 ? 1 : 0,
                                   j == 0 ? &up : nullptr, j == 2 ? &computed : nullptr),
            "stream kernels", dn);
    }
    if (packed) {
      // A sequence that goes on carries the last segment's state into the next piece.
      const Segment& last = segments.back();
      if (!last.ends) {
        const std::size_t k = segments.size() - 1;
        const Buffer* dst[3] = {&im.C[to], &im.n[to], &im.m[to]};
        for (std::size_t j = 0; j < 3; ++j) {
          check(clEnqueueCopyBuffer(im.kernels, s.last[j].get(), dst[j]->get(), k * dst[j]->bytes(), 0, dst[j]->bytes(),
                                    0, nullptr, nullptr),
                "clEnqueueCopyBuffer(stream carried state)", dn);
        }
      }
      for (std::size_t k = 0; k < segments.size(); ++k)
        if (segments[k].ends && !segments[k].c_out.empty()) ended.push_back(k);
    }
    if (im.keep_states) {
      // The state leaving this piece, copied before the next piece's kernels write over its buffers (the kernel
      // queue is in order).
      std::array<PooledBuffer, 3> copy;
      const Buffer* from_state[3] = {&im.C[to], &im.n[to], &im.m[to]};
      for (std::size_t j = 0; j < 3; ++j) {
        copy[j] = device_->acquire(from_state[j]->bytes());
        check(clEnqueueCopyBuffer(im.kernels, from_state[j]->get(), copy[j].get(), 0, 0, from_state[j]->bytes(), 0,
                                  nullptr, nullptr),
              "clEnqueueCopyBuffer(stream state kept)", dn);
      }
      im.kept.push_back(std::move(copy));
    }
    if (!im.state_out[0].empty()) {
      // The state leaving this piece, copied on the device before the next piece's kernels write over it; the
      // download queue brings it into the caller's memory behind h (below). Read from the kernel queue, the
      // caller's ordinary memory held the kernels of the next piece for every sequence of a packed row.
      const Buffer* from_state[3] = {&im.C[to], &im.n[to], &im.m[to]};
      for (std::size_t j = 0; j < 3; ++j) {
        if (!s.state_copy[j].get()) s.state_copy[j] = device_->alloc(from_state[j]->bytes());
        check(clEnqueueCopyBuffer(im.kernels, from_state[j]->get(), s.state_copy[j].get(), 0, 0,
                                  im.state_out[j].nbytes(), 0, nullptr, j == 2 ? &state_copied : nullptr),
              "clEnqueueCopyBuffer(stream state out)", dn);
      }
      state_out = im.state_out;
      im.state_out = {};
    }
    clFlush(im.kernels);
    after_compute = computed;
    im.state = to;
    im.has_state = !packed || !segments.back().ends;  // packed: the next piece starts a sequence afresh
  } else {
    clRetainEvent(up);
    computed = up;
  }
  const bool deferred = !out && !s.page_locked;
  if (deferred) {
    // Ordinary memory: h is read when taken or when its slot is reused (read_deferred_h), not held up here.
    clRetainEvent(after_compute);
    down = after_compute;
  } else if (!out) {
    check(clEnqueueReadBuffer(im.down, s.h.get(), CL_FALSE, 0, vb, s.host_out, 1, &after_compute, &down),
          "clEnqueueReadBuffer(stream download)", dn);
  } else {
    // h's B*NH rows straight into the caller's page-locked h.
    detail::enqueue_rows(im.down, /*write=*/false, s.h.get(), *out, &after_compute, &down, dn);
    bytes_direct_down_ += vb;
    device_->note_direct_download(vb);
  }
  s.last_to.clear();
  if (!ended.empty()) {
    // The last states of the sequences that ended in this piece, behind h on the (in-order) download queue (the
    // piece is down when they are): rows ended.front() .. ended.back() of each part in one read into the slot's
    // page-locked staging ([C rows][n rows][m rows], M rows each), from where deliver_last_states() copies each into
    // the caller's views. (Read into the caller's ordinary memory, 3 reads a sequence stalled the submitting thread.)
    cl_event last_down = nullptr;
    const std::size_t M = static_cast<std::size_t>(config_.max_segments), k0 = ended.front(), k1 = ended.back() + 1;
    auto state_part = [&](std::size_t k, std::size_t j) -> const TensorView& {  // C, n or m of segment k's state
      return j == 0 ? segments[k].c_out : j == 1 ? segments[k].n_out : segments[k].m_out;
    };
    std::size_t base = 0;
    for (std::size_t j = 0; j < 3; ++j) {
      const std::size_t bytes = state_part(k0, j).nbytes();
      const cl_int err =
          clEnqueueReadBuffer(im.down, s.last[j].get(), CL_FALSE, k0 * bytes, (k1 - k0) * bytes,
                              s.host_last + base + k0 * bytes, 1, &after_compute, j == 2 ? &last_down : nullptr);
      if (err != CL_SUCCESS) release_event(last_down);
      check(err, "clEnqueueReadBuffer(stream sequences' last states)", dn);
      for (const std::size_t k : ended) s.last_to.emplace_back(base + k * bytes, state_part(k, j));
      base += M * bytes;
    }
    release_event(down);
    down = last_down;
  }
  if (state_copied) {
    // Behind h on the (in-order) download queue: the piece is down when its state is.
    cl_event state_down = nullptr;
    for (std::size_t j = 0; j < 3; ++j) {
      const cl_int err = clEnqueueReadBuffer(im.down, s.state_copy[j].get(), CL_FALSE, 0, state_out[j].nbytes(),
                                             state_out[j].bytes(), 1, &state_copied, j == 2 ? &state_down : nullptr);
      if (err != CL_SUCCESS) release_event(state_copied);
      check(err, "clEnqueueReadBuffer(stream state out)", dn);
    }
    release_event(state_copied);
    release_event(down);
    down = state_down;
  }
  clFlush(im.down);
  bytes_down_ += vb;
  {
    std::lock_guard lock(mutex_);
    s.up = up;
    s.computed = computed;
    s.down = down;
    s.ticket = ticket;
    s.len = len;
    s.direct_out = out || deferred ? out_view : TensorView();
    s.deferred_h = deferred;
    s.busy = true;
    s.taken = false;
  }
  if (!s.page_locked) ++pageable_pieces_;
  tokens_ += len;
  return ticket;
}

std::uint64_t DeviceStream::push(const ForwardArgs& piece, bool inputs_outlive_piece, TensorView h_dest) {
  const Config& c = config_;
  ProblemShape stream;
  stream.B = c.B;
  stream.NH = c.NH;
  stream.DHQK = c.DHQK;
  stream.DHHV = c.DHHV;
  const ProblemShape p = check_stream_piece(piece, stream, c.options);
  const ScopedTrace trace([&] { return "stream piece " + std::to_string(next_ticket_) + " pushed"; });
  HostPiece h = next_piece(p.S);
  // A slot still in ordinary memory (Config::staging) uploads every input it can from where it lies: a copy into
  // ordinary staging would only add one.
  const bool ordinary = !slot_of(next_ticket_).page_locked;
  const std::pair<ConstTensorView, TensorView> inputs[5] = {
      {piece.q, h.q}, {piece.k, h.k}, {piece.v, h.v}, {piece.i, h.i}, {piece.f, h.f}};
  detail::HostRows direct[5];
  bool any_direct = false;
  for (std::size_t j = 0; j < 5; ++j) {
    const auto& [from, staging] = inputs[j];
    if (const auto src = detail::pinned_rows(*device_, from, staging.dtype())) {
      direct[j] = *src;
      any_direct = true;
      bytes_direct_ += src->bytes();
      device_->note_direct_upload(src->bytes());
    } else if (const auto rows = ordinary ? detail::host_rows(from, staging.dtype()) : std::nullopt) {
      direct[j] = *rows;
      any_direct = true;
    } else {
      copy_into(from, staging);
    }
  }
  std::optional<detail::HostRows> out;
  if (!h_dest.empty()) {
    check_output_rows(h_dest, {c.B, c.NH, p.S, c.DHHV}, c.dtype, "h_dest");
    out = detail::pinned_rows(*device_, h_dest, c.dtype);
  }
  const std::uint64_t ticket = enqueue_piece(direct, out ? &*out : nullptr, h_dest);
  if (any_direct && !inputs_outlive_piece) {
    // The caller may change or free its inputs once push returns: their uploads finish first.
    cl_event up = nullptr;
    {
      std::lock_guard lock(mutex_);
      up = slot_of(ticket).up;
      clRetainEvent(up);
    }
    const cl_int waited = clWaitForEvents(1, &up);
    clReleaseEvent(up);
    check(waited, "clWaitForEvents(stream upload)", device_->name());
  }
  return ticket;
}

Tensor DeviceStream::take(std::uint64_t ticket) {
  std::unique_lock lock(mutex_);
  if (auto it = finished_.find(ticket); it != finished_.end() && it->second.direct.empty()) {
    Tensor h = std::move(it->second.h);
    finished_.erase(it);
    return h;
  }
  const std::int64_t len = slot_of(ticket).len;
  lock.unlock();
  Tensor h({config_.B, config_.NH, len, config_.DHHV}, config_.dtype);
  take_into(ticket, h.view());
  return h;
}

void DeviceStream::take_into(std::uint64_t ticket, TensorView out) {
  // A piece's h (contiguous, at `src`) into `out` (copy_piece_rows checks its shape and row layout).
  auto copy_out = [&](const std::byte* src, std::int64_t len) {
    copy_piece_rows(ConstTensorView(src, config_.dtype, {config_.B, config_.NH, len, config_.DHHV}), out);
  };
  std::unique_lock lock(mutex_);
  if (auto it = finished_.find(ticket); it != finished_.end()) {
    const Finished f = std::move(it->second);
    finished_.erase(it);
    lock.unlock();
    if (f.direct.empty()) {
      copy_out(f.h.bytes(), f.h.dim(2));
    } else if (f.direct.bytes() != out.bytes() || f.direct.strides() != out.strides()) {
      copy_piece_rows(f.direct, out);  // downloaded into h_dest, taken elsewhere
    }
    return;
  }
  Slot& s = slot_of(ticket);
  if (!s.busy || s.ticket != ticket || s.taken || s.taking)
    throw InvalidArgument("ticket",
                          "no piece " + std::to_string(ticket) + " waiting (already taken or never submitted)");
  s.taking = true;
  cl_event down = s.down;
  clRetainEvent(down);
  lock.unlock();
  const ScopedTrace trace([&] { return "stream piece " + std::to_string(ticket) + " taken"; });
  cl_int waited = clWaitForEvents(1, &down);
  clReleaseEvent(down);
  std::exception_ptr failed;
  if (waited == CL_SUCCESS) {
    try {
      deliver_last_states(s);
      if (s.deferred_h) {
        read_deferred_h(s, out);
      } else if (s.direct_out.empty()) {
        copy_out(s.host_out, s.len);
      } else if (s.direct_out.bytes() != out.bytes() || s.direct_out.strides() != out.strides()) {
        copy_piece_rows(s.direct_out, out);
      } else {
        check_output_rows(out, s.direct_out.shape(), s.direct_out.dtype(), "out");
      }
    } catch (...) {
      failed = std::current_exception();
    }
  }
  lock.lock();
  s.taking = false;
  if (waited == CL_SUCCESS && !failed) s.taken = true;
  lock.unlock();
  slot_free_.notify_all();
  check(waited, "clWaitForEvents(stream download)", device_->name());
  if (failed) std::rethrow_exception(failed);
}

ConstTensorView DeviceStream::view(std::uint64_t ticket) {
  std::unique_lock lock(mutex_);
  Slot& s = slot_of(ticket);
  if (!s.busy || s.ticket != ticket || s.taken || s.taking)
    throw InvalidArgument("ticket", "no piece " + std::to_string(ticket) +
                                        " waiting in its slot (taken, copied aside "
                                        "by a later next_piece(), or never submitted)");
  s.taking = true;
  cl_event down = s.down;
  clRetainEvent(down);
  lock.unlock();
  const cl_int waited = clWaitForEvents(1, &down);
  clReleaseEvent(down);
  const TensorView at = !s.direct_out.empty()
                            ? s.direct_out
                            : TensorView(s.host_out, config_.dtype, {config_.B, config_.NH, s.len, config_.DHHV});
  std::exception_ptr failed;
  if (waited == CL_SUCCESS && s.deferred_h) {
    try {
      read_deferred_h(s, at);
    } catch (...) {
      failed = std::current_exception();
    }
  }
  lock.lock();
  s.taking = false;
  if (waited == CL_SUCCESS && !failed) {
    deliver_last_states(s);
    s.taken = true;
  }
  lock.unlock();
  slot_free_.notify_all();
  check(waited, "clWaitForEvents(stream download)", device_->name());
  if (failed) std::rethrow_exception(failed);
  return at;
}

void DeviceStream::finish() {
  for (cl_command_queue q : {impl_->up, impl_->kernels, impl_->down, impl_->reads})
    check(clFinish(q), "clFinish(stream)", device_->name());
  impl_->drop_held(true);
}

void DeviceStream::set_segments(std::vector<Segment> segments) {
  Impl& im = *impl_;
  const Config& c = config_;
  if (c.max_segments <= 0) throw Error("DeviceStream::set_segments: not a stream of packed sequences (max_segments)");
  if (segments.empty() || static_cast<std::int64_t>(segments.size()) > c.max_segments)
    throw InvalidArgument("segments", "a piece holds 1.." + std::to_string(c.max_segments) + " segments, got " +
                                          std::to_string(segments.size()));
  std::vector<std::array<Tensor, 3>> initial(segments.size());
  for (std::size_t k = 0; k < segments.size(); ++k) {
    const Segment& g = segments[k];
    const std::int64_t begin = k == 0 ? 0 : segments[k - 1].t1;
    if (g.t0 != begin || g.t1 <= g.t0 || g.t1 > c.max_piece)
      throw InvalidArgument("segments", "segment " + std::to_string(k) + " covers [" + std::to_string(g.t0) + ", " +
                                            std::to_string(g.t1) + "): segments follow each other from token 0, " +
                                            "none empty, within max_piece");
    if (!g.starts && k != 0) throw InvalidArgument("segments", "only the first segment may go on from the last piece");
    if (!g.ends && k + 1 != segments.size())
      throw InvalidArgument("segments", "only the last segment may go on into the next piece");
    if (g.starts && !(g.c0.empty() && g.n0.empty() && g.m0.empty())) {
      const std::pair<ConstTensorView, Shape> parts[3] = {
          {g.c0, {c.B, c.NH, c.DHQK, c.DHHV}}, {g.n0, {c.B, c.NH, c.DHQK}}, {g.m0, {c.B, c.NH}}};
      const char* names[3] = {"c0", "n0", "m0"};
      for (std::size_t j = 0; j < 3; ++j) {
        if (parts[j].first.shape() != parts[j].second)
          throw InvalidArgument(names[j], "expected shape " + shape_to_string(parts[j].second) + ", got " +
                                              shape_to_string(parts[j].first.shape()));
        initial[k][j] = Tensor::copy_of(parts[j].first, DType::f32);
      }
    }
    if (g.ends && !(g.c_out.empty() && g.n_out.empty() && g.m_out.empty()))
      check_state_views(g.c_out, g.n_out, g.m_out, c.B, c.NH, c.DHQK, c.DHHV);
  }
  im.segments = std::move(segments);
  im.segment_initial = std::move(initial);
}

std::vector<DeviceStream::Segment> DeviceStream::segments_of(const ForwardArgs& a, const packed::Piece& piece,
                                                             TensorView C, TensorView n, TensorView m) {
  std::vector<Segment> out;
  for (const packed::Part& part : packed::parts(a, piece)) {
    const std::int64_t j = part.sequence;
    Segment g;
    g.t0 = part.t0;
    g.t1 = part.t1;
    g.starts = part.starts;
    if (g.starts && a.has_initial_state()) {
      g.c0 = packed::rows(a.c0, j, j + 1);
      g.n0 = packed::rows(a.n0, j, j + 1);
      g.m0 = packed::rows(a.m0, j, j + 1);
    }
    g.ends = part.ends;
    if (g.ends && !C.empty()) {
      g.c_out = packed::rows(C, j, j + 1);
      g.n_out = packed::rows(n, j, j + 1);
      g.m_out = packed::rows(m, j, j + 1);
    }
    out.push_back(g);
  }
  return out;
}

int DeviceStream::packed_tables(Slot& s, const std::vector<Segment>& segments,
                                const std::vector<std::array<Tensor, 3>>& initial) const {
  const Impl& im = *impl_;
  std::vector<std::int64_t> bounds{0};
  for (const Segment& g : segments) bounds.push_back(g.t1);
  const detail::PackedChunks t = detail::packed_chunks(bounds, im.cfg.L);
  s.ctab_host = t.ctab;
  // A segment starts from the stream's state (going on), its own initial state, or zero.
  s.stab_host = t.segment_table([&](int k) {
    const auto u = static_cast<std::size_t>(k);
    return (segments[u].starts ? !initial[u][0].empty() : im.has_state) ? k : -1;
  });
  return t.chunks();
}

void DeviceStream::write_segment_initial_states(const std::vector<Segment>& segments,
                                                std::vector<std::array<Tensor, 3>>& initial) {
  Impl& im = *impl_;
  const std::string& dn = device_->name();
  im.drop_held(false);
  for (std::size_t k = 0; k < segments.size(); ++k) {
    for (std::size_t j = 0; j < 3; ++j) {
      const Buffer* carried[3] = {&im.C[im.state], &im.n[im.state], &im.m[im.state]};
      const std::size_t row_bytes = carried[j]->bytes();
      if (!segments[k].starts && im.has_state) {
        // On the kernel queue: after the kernels of the piece before, which wrote the carried state.
        check(clEnqueueCopyBuffer(im.kernels, carried[j]->get(), im.in[j].get(), 0, k * row_bytes, row_bytes, 0,
                                  nullptr, nullptr),
              "clEnqueueCopyBuffer(stream carried state)", dn);
      } else if (segments[k].starts && !initial[k][j].empty()) {
        im.held.push_back({nullptr, std::move(initial[k][j])});
        Impl::HeldState& x = im.held.back();
        check(clEnqueueWriteBuffer(im.kernels, im.in[j].get(), CL_FALSE, k * row_bytes, x.host.nbytes(), x.host.bytes(),
                                   0, nullptr, &x.written),
              "clEnqueueWriteBuffer(sequence's initial state)", dn);
      }
    }
  }
}

void DeviceStream::start_sequence(ConstTensorView c0, ConstTensorView n0, ConstTensorView m0) {
  Impl& im = *impl_;
  const Config& c = config_;
  if (c.max_segments > 0)
    throw Error("DeviceStream::start_sequence: a stream of packed sequences takes Segment::starts and c0/n0/m0");
  im.drop_held(false);
  im.has_state = false;  // the zero state: the next piece's kernels read no state
  if (c0.empty() && n0.empty() && m0.empty()) return;
  if (c0.empty() || n0.empty() || m0.empty()) throw InvalidArgument("c0", "c0, n0 and m0 must be given together");
  // Into the buffers the next piece reads, on the kernel queue: after the kernels of the pieces before (in order).
  auto put = [&](ConstTensorView t, const Buffer& b, const char* name, const Shape& want) {
    if (t.shape() != want)
      throw InvalidArgument(name, "expected shape " + shape_to_string(want) + ", got " + shape_to_string(t.shape()));
    im.held.push_back({nullptr, Tensor::copy_of(t, DType::f32)});
    Impl::HeldState& x = im.held.back();
    check(
        clEnqueueWriteBuffer(im.kernels, b.get(), CL_FALSE, 0, x.host.nbytes(), x.host.bytes(), 0, nullptr, &x.written),
        "clEnqueueWriteBuffer(sequence's initial state)", device_->name());
  };
  put(c0, im.C[im.state], "c0", {c.B, c.NH, c.DHQK, c.DHHV});
  put(n0, im.n[im.state], "n0", {c.B, c.NH, c.DHQK});
  put(m0, im.m[im.state], "m0", {c.B, c.NH});
  im.has_state = true;
}

void DeviceStream::state_after_next_piece_into(TensorView C, TensorView n, TensorView m) {
  const Config& c = config_;
  if (c.max_segments > 0)
    throw Error("DeviceStream::state_after_next_piece_into: a stream of packed sequences takes Segment::c_out");
  check_state_views(C, n, m, c.B, c.NH, c.DHQK, c.DHHV);
  impl_->state_out = {C, n, m};
}

void DeviceStream::keep_states(bool keep) {
  if (keep && config_.max_segments > 0)
    throw Error("DeviceStream::keep_states: a stream of packed sequences keeps no states (its pieces end anywhere)");
  impl_->keep_states = keep;
}

std::vector<DeviceState> DeviceStream::take_kept_states() {
  Impl& im = *impl_;
  const Config& c = config_;
  check(clFinish(im.kernels), "clFinish(stream kernels)", device_->name());
  std::vector<DeviceState> out;
  out.reserve(im.kept.size());
  for (auto& kept : im.kept) {
    auto buffers = std::make_shared<detail::KeptStateBuffers>(detail::KeptStateBuffers{device_, std::move(kept)});
    DeviceState d;
    d.device = device_.get();
    d.handle = buffers;
    d.download = [buffers, c] {
      State s{Tensor({c.B, c.NH, c.DHQK, c.DHHV}, DType::f32), Tensor({c.B, c.NH, c.DHQK}, DType::f32),
              Tensor({c.B, c.NH}, DType::f32)};
      Tensor* to[3] = {&s.C, &s.n, &s.m};
      for (std::size_t j = 0; j < 3; ++j) buffers->device->download(buffers->state[j], to[j]->bytes(), to[j]->nbytes());
      return s;
    };
    out.push_back(std::move(d));
  }
  im.kept.clear();
  return out;
}

void DeviceStream::read_state(Tensor& C, Tensor& n, Tensor& m) {
  Impl& im = *impl_;
  const Config& c = config_;
  check(clFinish(im.kernels), "clFinish(stream kernels)", device_->name());
  C = Tensor({c.B, c.NH, c.DHQK, c.DHHV}, DType::f32);
  n = Tensor({c.B, c.NH, c.DHQK}, DType::f32);
  m = Tensor({c.B, c.NH}, DType::f32);
  if (!im.has_state) {
    std::memset(C.bytes(), 0, C.nbytes());
    std::memset(n.bytes(), 0, n.nbytes());
    std::memset(m.bytes(), 0, m.nbytes());
    return;
  }
  for (auto [t, b] :
       {std::pair<Tensor*, const Buffer*>{&C, &im.C[im.state]}, {&n, &im.n[im.state]}, {&m, &im.m[im.state]}})
    check(clEnqueueReadBuffer(im.kernels, b->get(), CL_TRUE, 0, t->nbytes(), t->bytes(), 0, nullptr, nullptr),
          "clEnqueueReadBuffer(stream state)", device_->name());
  if (c.options.gate == GateVariant::sigmoid) std::memset(m.bytes(), 0, m.nbytes());
}

}  // namespace mlstm::opencl
