// Host streaming through one OpenCL device: a long sequence arrives in pieces on the host, each piece goes
// up, is computed with the state (C, n, m) staying on the device, and its h comes back, with transfers and
// compute overlapped. Three in-order queues (uploads, kernels, downloads) linked by events, and two slots of
// pinned (page-locked) host staging and device buffers: while piece p computes, piece p+1 goes up and
// piece p-1's h comes back (double buffering; PCIe is full duplex).
//
//   opencl::DeviceStream stream(device, config);
//   for (each piece) {
//     auto slot = stream.next_piece(len);        // pinned host tensors: fill them in place (fastest), or
//     ... fill slot.q, slot.k, slot.v, slot.i, slot.f ...
//     tickets.push_back(stream.submit());        // ... call stream.push(piece_args) to copy from your tensors
//   }
//   Tensor h = stream.take(ticket);              // h of a piece (waits for it); any order
//
// Threads: one producer calls next_piece/submit/push (in sequence order); take() may be called from another
// thread (DeviceStreamNode's completion thread does).
// Kernels: the tensor-core path (NVIDIA sm_80+, bf16/fp16, head dims multiples of 16, chunk 64|128), or
// its emulation (Config::emulate, tests on PoCL). tensor_core_fit() says which problems qualify; other
// problems stream through StreamSession with one synchronous kernel call per piece.
#pragma once

#include <CL/cl.h>

#include <array>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "mlstm/core/packed.hpp"
#include "mlstm/core/problem.hpp"
#include "mlstm/core/tensor.hpp"
#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl {

namespace detail {
struct HostRows;  // rows of a tensor in page-locked memory (internal)
}  // namespace detail

class DeviceStream {
 public:
  struct Config {
    std::int64_t B = 1, NH = 1, DHQK = 0, DHHV = 0;
    std::int64_t max_piece = 16384;  // tokens per piece at most (buffers are sized for it)
    DType dtype = DType::bf16;       // q, k, v and h
    MlstmOptions options;            // gate, normalize, eps, chunk size
    bool emulate = false;            // tensor-core kernels without PTX (PoCL tests)
    bool compute = true;             // false: transfers only (measures the transfer bound of a stream)
    // > 0: a stream of packed sequences whose pieces may hold several sequences (the packed kernels, tc_states.cl
    // PACKED), at most this many segments per piece; every piece is described by set_segments() before it is
    // submitted. Its buffers take max_segments states more (the initial states written, the last ones read).
    std::int64_t max_segments = 0;
    // How pieces reach the device. Page-locking a slot's staging takes tens of milliseconds (0.5 s per GiB on the
    // H200 host), which came before a run's first token. automatic: it happens on a thread of its own while the
    // first pieces go through ordinary memory (uploaded from the caller's tensors where push() can, h read from the
    // device when taken); each slot turns page-locked once its staging is ready. page_locked: every piece waits for
    // its slot's page-locked staging (page-locked on the same thread, slot after slot). pageable: nothing is
    // page-locked.
    enum class Staging { automatic, page_locked, pageable };
    // page_locked by default: automatic has not yet shown a sooner first token on a GPU (docs/PERFORMANCE.md).
    Staging staging = Staging::page_locked;
  };
  // One sequence's tokens in a piece of a packed stream (set_segments).
  struct Segment {
    std::int64_t t0 = 0, t1 = 0;  // the piece's tokens [t0, t1)
    // A sequence starts at t0, from c0/n0/m0 (float32, the stream's (B,NH,...) state shapes) or, empty, the zero
    // state; false (the first segment only): the sequence of the previous piece goes on, from the stream's state.
    bool starts = true;
    ConstTensorView c0, n0, m0;
    // The sequence ends at t1 (false: the last segment only, its sequence goes on in the next piece); its last state
    // goes into c_out/n_out/m_out (float32, the stream's state shapes, contiguous) when given, downloaded behind the
    // piece's h: they stay valid and untouched until finish().
    bool ends = true;
    TensorView c_out, n_out, m_out;
  };
  // Pinned host tensors of one piece: q, k (B,NH,len,DHQK), v (B,NH,len,DHHV) in the stream's dtype,
  // i, f (B,NH,len) float32, contiguous.
  struct HostPiece {
    TensorView q, k, v, i, f;
    std::int64_t len = 0;
  };

  // Starts from the zero state, or from c0/n0/m0 (float32, shapes as in ForwardArgs) when given.
  DeviceStream(std::shared_ptr<Device> device, Config config, ConstTensorView c0 = {}, ConstTensorView n0 = {},
               ConstTensorView m0 = {});
  ~DeviceStream();  // waits for everything enqueued
  DeviceStream(const DeviceStream&) = delete;
  DeviceStream& operator=(const DeviceStream&) = delete;

  // The staging tensors of the next piece (waits until its slot is free; an h not yet taken from that slot
  // is copied aside first). 1 <= len <= max_piece, else InvalidArgument("len"). Page-locked, or ordinary memory
  // while the slot's page-locked staging is not ready yet (Config::staging).
  HostPiece next_piece(std::int64_t len);
  // Enqueues the piece filled through next_piece(); returns its ticket (0, 1, 2, ...).
  std::uint64_t submit();
  // next_piece + a copy of `piece` (validated against the config; c0/n0/m0 must be empty) + submit. An input
  // that lies in this device's page-locked memory (Device::pinned_tensor), in the stream's dtype (float32 for
  // i and f) with rows of len*D contiguous elements (a slice of a longer sequence, say) is not copied: its upload
  // reads it where it is (one rectangular DMA), so only the other inputs pass through the staging. Such inputs
  // are read after push() returns: push waits for its uploads unless `inputs_outlive_piece`, where the caller
  // promises to keep them unchanged until the piece's h is taken (or finish()/restart()/destruction).
  // `h_dest` (optional): where the piece's h will be taken to (take_into with the same view). When it lies in this
  // device's page-locked memory with rows of len*DHHV contiguous elements, the download writes h there directly
  // (no staging, no host copy) and take_into(ticket, h_dest) only waits for it; the caller keeps that memory until
  // then. Anywhere else it changes nothing.
  std::uint64_t push(const ForwardArgs& piece, bool inputs_outlive_piece = false, TensorView h_dest = {});
  // h of a submitted piece, (B,NH,len,DHHV) in the stream's dtype; waits for it. Each ticket once.
  Tensor take(std::uint64_t ticket);
  // take() into `out`, (B,NH,len,DHHV) of the stream's dtype whose rows of len*DHHV elements are contiguous, one
  // every out.strides()[1] elements (a slice of a longer h): one copy, from the pinned staging (or from the copy
  // a later next_piece() set aside; a piece that went through ordinary memory is read from the device into `out`).
  // Like take(), safe from another thread than the producer's.
  void take_into(std::uint64_t ticket, TensorView out);
  // Zero-copy: h of a submitted piece as a view of the pinned staging, or of its h_dest (waits for it; a piece that
  // went through ordinary memory is read there first). Valid until the slot is reused, i.e. until next_piece() is
  // called for the piece submitted 3 pieces later. Each ticket once (view or take).
  ConstTensorView view(std::uint64_t ticket);
  // The current state (after every submitted piece), float32; waits for the kernels.
  void read_state(Tensor& C, Tensor& n, Tensor& m);
  void finish();  // waits for every enqueued transfer and kernel
  // With keep_states(true), every piece submitted from then on keeps the state leaving it: a copy on the device,
  // enqueued after the piece's kernels (rows x (DHQK*DHHV + DHQK + 1) float32s each). take_kept_states() waits for
  // the kernels and hands them over in submission order as DeviceStates (they stay on the device; a backward stream
  // there copies them where it starts its pieces, anything else downloads them), and forgets them. restart()
  // forgets them and turns keeping off.
  void keep_states(bool keep);
  std::vector<DeviceState> take_kept_states();
  // Packed sequences through one stream: the next submitted piece starts a new sequence, from the zero state or from
  // c0/n0/m0 (float32, the stream's (B,NH,...) state shapes). Unlike restart(), nothing waits: the pieces before go
  // on computing, their h stay to be taken, tickets continue. (The initial state's host copy is held until its
  // write to the device has completed.)
  void start_sequence(ConstTensorView c0 = {}, ConstTensorView n0 = {}, ConstTensorView m0 = {});
  // The state leaving the next submitted piece goes into C, n, m (float32, the stream's state shapes, contiguous),
  // downloaded without waiting: they stay valid and untouched until finish(). (The sigmoid gate's m is whatever its
  // kernels leave there; the gate has no stabiliser, m = 0.)
  void state_after_next_piece_into(TensorView C, TensorView n, TensorView m);
  // A stream of packed sequences (Config::max_segments): the sequences of the next submitted piece, in token order,
  // covering it, at most max_segments (InvalidArgument("segments") otherwise). The initial states are copied
  // (held until written); the state leaving the piece is the last segment's when its sequence goes on.
  void set_segments(std::vector<Segment> segments);
  // The segments of `piece` (packed::spanning_pieces) of a packed row: each sequence starting in it from its row of
  // packed.c0/n0/m0 (the zero state without them), each ending in it into its row of C/n/m ((N, NH, ...) float32;
  // empty: not wanted).
  static std::vector<Segment> segments_of(const ForwardArgs& packed, const packed::Piece& piece, TensorView C = {},
                                          TensorView n = {}, TensorView m = {});
  // Begins another sequence on the same staging and device buffers (setting up a stream costs more than a
  // short sequence): waits for everything enqueued, forgets every h not taken, and starts from the zero state
  // or from c0/n0/m0 (as in the constructor). Tickets start again at 0; segments set for a piece not yet submitted
  // are forgotten. Not while a take() runs.
  void restart(ConstTensorView c0 = {}, ConstTensorView n0 = {}, ConstTensorView m0 = {});

  std::int64_t tokens() const noexcept { return tokens_; }
  const Config& config() const noexcept { return config_; }
  std::uint64_t bytes_up() const noexcept { return bytes_up_; }          // host -> device so far
  std::uint64_t bytes_down() const noexcept { return bytes_down_; }      // device -> host so far
  std::uint64_t bytes_direct() const noexcept { return bytes_direct_; }  // of bytes_up(): read from pinned inputs
  std::uint64_t bytes_direct_down() const noexcept { return bytes_direct_down_; }  // of bytes_down(): into h_dest
  // Pieces that went through ordinary memory because their slot's page-locked staging was not ready (or
  // Staging::pageable).
  std::uint64_t pageable_pieces() const noexcept { return pageable_pieces_; }

 private:
  struct Slot;
  struct Impl;
  void deliver_last_states(Slot& s);  // packed: the ended sequences' states into the caller's views
  Slot& slot_of(std::uint64_t ticket);
  void retire(Slot& slot);                             // waits for the slot's piece and keeps its h aside if not taken
  void set_up(Slot& slot);                             // its device buffers, kernels and ordinary-memory staging
  void page_lock(Slot& slot, cl_command_queue queue);  // its page-locked staging (on the staging thread)
  // Slot s (of index j) turns to its page-locked staging when that is ready, or waits for it when `wait`
  // (rethrows the staging thread's error). Only between pieces: after retire(s).
  void adopt_staging(Slot& s, int j, bool wait);
  void read_deferred_h(Slot& s, TensorView to);  // an ordinary-memory piece's h, from the device (blocking)
  void load_state(ConstTensorView c0, ConstTensorView n0, ConstTensorView m0);  // the state entering the next piece
  // Packed: the piece's chunk and segment tables into the slot's host copies (tc_common.cl CHUNK_START, tc_states.cl
  // PACKED); returns the chunk count. Then the segments' initial states onto the kernel queue.
  int packed_tables(Slot& slot, const std::vector<Segment>& segments,
                    const std::vector<std::array<Tensor, 3>>& initial) const;
  void write_segment_initial_states(const std::vector<Segment>& segments, std::vector<std::array<Tensor, 3>>& initial);

  std::shared_ptr<Device> device_;
  Config config_;
  std::unique_ptr<Impl> impl_;
  std::mutex mutex_;  // slot states and finished_ (take() may run on another thread)
  std::condition_variable slot_free_;
  // Pieces whose slot was reused before take(): h copied aside, or (direct) already in the caller's h_dest.
  struct Finished {
    Tensor h;
    TensorView direct;
  };
  std::map<std::uint64_t, Finished> finished_;
  std::uint64_t next_ticket_ = 0;
  std::int64_t tokens_ = 0, pending_len_ = 0;
  std::uint64_t bytes_up_ = 0, bytes_down_ = 0, bytes_direct_ = 0;
  std::uint64_t bytes_direct_down_ = 0, pageable_pieces_ = 0;
  // submit(), some inputs uploaded from where they lie (`direct`: 5 or nullptr; push with pinned inputs), h into
  // the caller's page-locked `out` when it is not null.
  std::uint64_t enqueue_piece(const detail::HostRows* direct, const detail::HostRows* out = nullptr,
                              TensorView out_view = {});
};

}  // namespace mlstm::opencl
