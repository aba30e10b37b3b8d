// CUDA implementation of fastbald::batchbald (greedy BatchBALD). The kernel bodies and the host
// driver are csrc/cuda/batchbald_kernels.h (shared with the emulator, emu/batchbald_emu.cpp); the
// per-row math is csrc/batchbald_math.h (shared with the CPU op). Registered with
// TORCH_LIBRARY_IMPL(fastbald, CUDA, m).
//
// Differences from the CPU op: lazy greedy only in the exact regime (probe the candidate of the
// largest bound, then evaluate every candidate whose bound reaches its gain: the same batch as a
// full evaluation); in the sampled regime every candidate is evaluated (the CPU's lazy=False).
// exp and log are the device's (the indices equal the CPU's but for gains tied to rounding).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "../batchbald_checks.h"
#include "batchbald_kernels.h"

namespace fastbald {
namespace cuda {
namespace bb {

template <class T, int ID>
__global__ void __launch_bounds__(kMaxBlock, 1) bb_kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char fb_smem[];
  body<T>(ID, P, fb_smem);
}

template <class T, int CB, bool kShared>
__global__ void __launch_bounds__(kMaxBlock) bb_eval_kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char fb_smem[];
  eval_body<T, CB, kShared>(P, fb_smem);
}

namespace {

template <class T, bool kShared>
void launch_eval(const dim3& g, const dim3& b, size_t sm, const Params& P, cudaStream_t s) {
  switch (P.CB) {
    case 2: bb_eval_kernel<T, 2, kShared><<<g, b, sm, s>>>(P); break;
    case 4: bb_eval_kernel<T, 4, kShared><<<g, b, sm, s>>>(P); break;
    case 5: bb_eval_kernel<T, 5, kShared><<<g, b, sm, s>>>(P); break;
    default: bb_eval_kernel<T, 8, kShared><<<g, b, sm, s>>>(P); break;
  }
}

template <class T>
void launch(int id, int64_t grid, int block, int64_t smem, const Params& P, cudaStream_t s) {
  const dim3 g(static_cast<unsigned>(grid)), b(static_cast<unsigned>(block));
  const size_t sm = static_cast<size_t>(smem);
  switch (id) {
    // The kernels that do not depend on the compute type run as their double instantiation.
    case kFirstPass: bb_kernel<double, kFirstPass><<<g, b, sm, s>>>(P); break;
    case kArgmax: bb_kernel<double, kArgmax><<<g, b, sm, s>>>(P); break;
    case kChosenProbs: bb_kernel<double, kChosenProbs><<<g, b, sm, s>>>(P); break;
    case kFinishTable: bb_kernel<double, kFinishTable><<<g, b, sm, s>>>(P); break;
    case kProbe: bb_kernel<double, kProbe><<<g, b, sm, s>>>(P); break;
    case kInitTable: bb_kernel<T, kInitTable><<<g, b, sm, s>>>(P); break;
    case kExtendExact: bb_kernel<T, kExtendExact><<<g, b, sm, s>>>(P); break;
    case kAppend: bb_kernel<T, kAppend><<<g, b, sm, s>>>(P); break;
    default:
      if (P.smem_p) {
        launch_eval<T, true>(g, b, sm, P, s);
      } else {
        launch_eval<T, false>(g, b, sm, P, s);
      }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Result batchbald_cuda(const at::Tensor& log_probs, int64_t batch_size, int64_t num_samples, int64_t seed,
                      bool use_double, bool lazy, double prob_tol) {
  check_batchbald_args(log_probs, batch_size, num_samples, prob_tol);
  TORCH_CHECK_VALUE(log_probs.is_cuda(), "fastbald.batchbald (CUDA kernel): log_probs is on ", log_probs.device());
  const c10::cuda::CUDAGuard guard(log_probs.device());
  at::Tensor x = log_probs;
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) x = x.to(at::kFloat);
  const int64_t N = x.size(0), K = x.size(1), C = x.size(2), b = batch_size;
  TORCH_CHECK_VALUE(K * (C + 7) < kMaxKC, "fastbald.batchbald (CUDA kernel): K * C = ", K * C,
                    " is too large (at most 2^28 per pool item); use the CPU op");
  const auto opts = x.options();
  at::Tensor idx = at::empty({b}, opts.dtype(at::kLong));
  at::Tensor scores = at::empty({b}, opts.dtype(at::kDouble));
  at::Tensor nev = at::empty({b}, opts.dtype(at::kLong));
  if (b == 0) return {idx, scores, nev};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  // The validity check reads a flag back on the host (to name the first bad item, like the CPU op):
  // not possible while the stream is captured into a CUDA graph.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "fastbald.batchbald: cannot run while the CUDA stream is being captured into a graph (it reads "
              "the input check's result back to the host)");

  const Config cfg;
  const int64_t tsize = use_double ? 8 : 4;
  const Workspace ws = layout(N, K, C, num_samples, b, tsize, cfg);
  at::Tensor work = at::empty({ws.total}, opts.dtype(at::kByte));
  unsigned char* base = work.mutable_data_ptr<uint8_t>();
  C10_CUDA_CHECK(cudaMemsetAsync(base + ws.flag, 0, 8, stream));
  C10_CUDA_CHECK(cudaMemsetAsync(base + ws.state, 0, 16, stream));

  Params P;
  std::memset(&P, 0, sizeof(P));
  P.x = x.const_data_ptr();
  P.x_double = x.scalar_type() == at::kDouble ? 1 : 0;
  P.N = N;
  P.K = K;
  P.C = C;
  P.sN = x.stride(0);
  P.sK = x.stride(1);
  P.sC = x.stride(2);
  P.tol = prob_tol;
  P.seed = static_cast<uint64_t>(seed);
  P.use_double = use_double ? 1 : 0;
  P.idx_out = idx.mutable_data_ptr<int64_t>();
  P.score_out = scores.mutable_data_ptr<double>();
  P.nev_out = nev.mutable_data_ptr<int64_t>();
  bind(P, base, ws);
  auto do_launch = [&](int id, int64_t grid, int block, int64_t smem, const Params& Q) {
    if (use_double) {
      launch<double>(id, grid, block, smem, Q, stream);
    } else {
      launch<float>(id, grid, block, smem, Q, stream);
    }
  };
  auto read_flag = [&] {
    unsigned long long v = 0;
    C10_CUDA_CHECK(cudaMemcpyAsync(&v, base + ws.flag, sizeof(v), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    return v;
  };
  const int64_t bad = drive(P, b, num_samples, lazy, cfg, do_launch, read_flag);
  if (bad >= 0) {
    // The CPU op names what is wrong with the first invalid item (same message on both devices).
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastbald::batchbald", "")
                               .typed<Result(const at::Tensor&, int64_t, int64_t, int64_t, bool, bool, double)>();
    const Result r = op.call(log_probs.cpu(), batch_size, num_samples, seed, use_double, false, prob_tol);
    // Only reached if the CPU's check (host exp) passes an item the device's flagged at the edge of
    // prob_tol: return the CPU's batch.
    return {std::get<0>(r).to(x.device()), std::get<1>(r).to(x.device()), std::get<2>(r).to(x.device())};
  }
  return {idx, scores, nev};
}

}  // namespace
}  // namespace bb
}  // namespace cuda
}  // namespace fastbald

TORCH_LIBRARY_IMPL(fastbald, CUDA, m) {
  m.impl("batchbald", &fastbald::cuda::bb::batchbald_cuda);
}
