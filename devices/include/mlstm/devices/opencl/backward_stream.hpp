// The backward of a long host-resident sequence through one OpenCL device in pieces, with transfers and
// compute overlapped (the tensor-core kernels; the backward counterpart of DeviceStream, stream.hpp).
//
//   1. States pass, pieces in sequence order: k, v, i, f go up; the state entering every piece is kept on the
//      device (float32, rows x (DHQK*DHHV + DHQK + 1) per piece: about 0.5-3% of the piece's input bytes).
//   2. Gradient pass, pieces in reverse order: q, k, v, i, f and dh go up; the piece's forward is recomputed from
//      its entering state, its backward runs with the gradient of the state leaving it (carried on the device
//      from the piece after it), and dq, dk, dv, di, df come down, straight into the result's slices.
//
// Three in-order queues (uploads, kernels, downloads) linked by events and three slots of page-locked staging
// and device buffers: while piece p computes, piece p-1 goes up and piece p+1's gradients come down (PCIe is full
// duplex). This thread fills the staging; a second one copies the gradients out of it, so the two host copies
// overlap each other as well as the transfers. Without it a backward uploads everything, computes, then
// downloads everything, one after the other.
//
// The results equal one backward call over the whole sequence within 16-bit rounding (pieces cut the chunks'
// 16-bit states at other places), like the flow graph's segments, which chain the same way. Packed sequences with
// Config::max_segments: pieces cut anywhere, each pass walking a piece's segments with the packed kernels (a
// sequence's state carried into the next piece in the states pass, its gradient into the piece before in the
// gradient pass; every other segment from its own initial state and last-state gradient, or zero).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "mlstm/core/packed.hpp"
#include "mlstm/core/problem.hpp"
#include "mlstm/devices/opencl/device.hpp"

namespace mlstm::opencl {

class BackwardStream {
 public:
  struct Config {
    std::int64_t B = 1, NH = 1, DHQK = 0, DHHV = 0;
    std::int64_t max_piece = 16384;  // tokens per piece (a multiple of the chunk size; buffers are sized for it)
    DType dtype = DType::bf16;       // q, k, v, dh and dq, dk, dv
    MlstmOptions options;            // gate, normalize, eps, chunk size
    bool emulate = false;            // tensor-core kernels without PTX (PoCL tests)
    // > 0: packed args run in pieces cut anywhere, each holding (parts of) at most this many sequences (the packed
    // kernels, tc_states.cl PACKED); 0: a piece never spans two sequences. Its buffers take 4 x max_segments states.
    std::int64_t max_segments = 0;
  };

  // Sets up the staging, the device buffers and the kernels. InvalidArgument("config...") for a bad
  // configuration, InvalidArgument("q") when the tensor cores cannot take it.
  BackwardStream(std::shared_ptr<Device> device, Config config);
  ~BackwardStream();  // waits for everything enqueued
  BackwardStream(const BackwardStream&) = delete;
  BackwardStream& operator=(const BackwardStream&) = delete;

  // The gradients of `args` (B, NH, head dims and dtype of the config; any S >= 1; tensors anywhere in host
  // memory, any strides), as TensorCoreRunner::backward gives them: dq, dk, dv in q's dtype, di, df in i's,
  // dc0/dn0/dm0 when args has an initial state. Packed args (cu_seqlens) run every sequence in one run, their pieces
  // pipelined (with max_segments, a piece holds several; else a piece never spans two sequences; the state and its
  // gradient start afresh at each), dc0/dn0/dm0 (N, ...). Not thread-safe: one call at a time.
  BackwardResult run(const BackwardArgs& args);
  // run() with the token gradients written into `out` (check_gradient_views; the result keeps dc0/dn0/dm0). Inputs
  // and dh that lie in this device's page-locked memory (Device::pinned_tensor) are uploaded from where they lie,
  // and gradients whose views lie there are downloaded straight into them: then no byte passes a host copy.
  BackwardResult run_into(const BackwardArgs& args, const GradientViews* out);
  // run_into() from the states a forward kept (StateCheckpoints) at every piece boundary: token from + j * max_piece
  // for j = 1 .. n-1 and from + S (the state leaving the call); an Error when one is missing. States that this
  // device keeps are copied on the device, others uploaded. The states pass is skipped: the gradient pass uploads
  // all of q, k, v, i, f and dh once. Not for packed args.
  BackwardResult run_into(const BackwardArgs& args, const GradientViews* out, const StateCheckpoints& kept,
                          std::int64_t from);

  const Config& config() const noexcept { return config_; }
  std::uint64_t bytes_up() const noexcept { return bytes_up_; }                    // host -> device, every run so far
  std::uint64_t bytes_down() const noexcept { return bytes_down_; }                // device -> host
  std::uint64_t bytes_direct_up() const noexcept { return bytes_direct_up_; }      // of bytes_up(): from pinned inputs
  std::uint64_t bytes_direct_down() const noexcept { return bytes_direct_down_; }  // of bytes_down(): into pinned views
  std::int64_t pieces() const noexcept { return pieces_; }                         // pieces of the last run
  // Pieces of the last run whose k, v, i, f stayed on the device between the two passes (all, or none when they
  // do not fit a quarter of its memory or MLSTM_BACKWARD_KEEP=off).
  std::int64_t kept_pieces() const noexcept { return kept_pieces_; }

 private:
  struct Slot;
  struct Impl;
  // The parts of the sequences in each piece (pieces spanning several sequences, Config::max_segments).
  using Part = packed::Part;
  void states_pass(const BackwardArgs& a, const std::vector<packed::Piece>& pieces,
                   const std::vector<std::vector<Part>>& parts);
  void gradient_pass(const BackwardArgs& a, const std::vector<packed::Piece>& pieces,
                     const std::vector<std::vector<Part>>& parts, const GradientViews& dest, BackwardResult& states);
  // Pieces spanning sequences: the piece's chunk and segment tables into `slot` (uploaded on the upload queue), the
  // segments' initial states into their rows (kernel queue); returns the chunk count.
  int packed_piece(Slot& slot, const std::vector<Part>& parts, std::size_t piece, bool has_init);
  // Enqueues the uploads of one piece's tensors (their slices [t0, t0+len) copied into slot's staging first, unless
  // they lie in the device's page-locked memory);
  // returns the event of the last one.
  cl_event upload(Slot& slot, const std::vector<std::pair<ConstTensorView, int>>& parts, std::int64_t t0,
                  std::int64_t len, std::int64_t piece);
  // The device buffer input `index` of piece `piece` goes into: the piece's kept one (k, v, i, f kept between the
  // passes), else the slot's.
  cl_mem input_buffer(const Slot& slot, int index, std::int64_t piece) const;

  std::shared_ptr<Device> device_;
  Config config_;
  std::unique_ptr<Impl> impl_;
  std::uint64_t bytes_up_ = 0, bytes_down_ = 0, bytes_direct_up_ = 0, bytes_direct_down_ = 0;
  std::int64_t pieces_ = 0, kept_pieces_ = 0;
  struct KeptStates {
    const StateCheckpoints* kept = nullptr;
    std::int64_t from = 0;
  };
  BackwardResult run_pieces(const BackwardArgs& args, const GradientViews* out, KeptStates given);
};

}  // namespace mlstm::opencl
