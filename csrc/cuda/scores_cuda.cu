// CUDA implementation of fastbald::pool_scores (design: NOTES.md; kernel bodies: kernels.h;
// launch planning: plan.h). Registered with TORCH_LIBRARY_IMPL(fastbald, CUDA, m).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "../checks.h"
#include "../report_bad_item.h"
#include "item_kernel.h"
#include "kernels.h"
#include "plan.h"
#include "strip_kernel.h"

namespace fastbald {
namespace cuda {

// bfloat16 rows of the strip kernel convert by a shift / mask per element.
template <>
struct StripIsBf16<c10::BFloat16> {
  static constexpr bool value = true;
};

constexpr int kMaxBlock = 256;

template <class S, class A>
__global__ void __launch_bounds__(kMaxBlock) tile_kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char fb_smem[];
  tile_body<S, A>(P, fb_smem);
}

template <class S, class A>
__global__ void __launch_bounds__(kMaxBlock) stream_kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char fb_smem[];
  stream_body<S, A>(P, fb_smem);
}

template <class S, int C>
__global__ void __launch_bounds__(kMaxBlock) item_kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char fb_smem[];
  item_body<S, C>(P, fb_smem);
}

template <class S, int NV, int kMode>
__global__ void __launch_bounds__(kMaxBlock) strip_kernel(const Params P) {
  extern __shared__ __align__(16) unsigned char fb_smem[];
  strip_body<S, NV, kMode>(P, fb_smem);
}

namespace {

DeviceLimits device_limits(int device) {
  DeviceLimits lim;
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  lim.smem_optin = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  lim.smem_per_sm = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  lim.num_sms = v;
  return lim;
}

// Test hook: FASTBALD_CUDA_PLAN="path=stream,generic=1,one_array=1,budget=3000,block=64,grid=2,
// args=1,kk=3,lanes=8" (path: tile / stream / item / strip) forces a kernel path / configuration (tests/test_cuda.py reaches every path with
// small inputs through it). Unset in normal use.
PlanOverrides overrides_from_env() {
  PlanOverrides ov;
  const char* env = std::getenv("FASTBALD_CUDA_PLAN");
  if (env == nullptr || *env == '\0') return ov;
  std::string s(env);
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t end = std::min(s.find(',', pos), s.size());
    const std::string item = s.substr(pos, end - pos);
    pos = end + 1;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) continue;
    const std::string k = item.substr(0, eq), v = item.substr(eq + 1);
    const long long n = std::atoll(v.c_str());
    if (k == "path") {
      ov.force_path = v == "stream"  ? kStreamPath
                      : v == "tile"  ? kTilePath
                      : v == "item"  ? kItemPath
                      : v == "strip" ? kStripPath
                                     : -1;
    } else if (k == "generic") {
      ov.force_generic = static_cast<int>(n);
    } else if (k == "one_array") {
      ov.force_one_array = static_cast<int>(n);
    } else if (k == "budget") {
      ov.tile_budget = n;
    } else if (k == "block") {
      TORCH_CHECK_VALUE(n >= 32 && n <= kMaxBlock && n % 32 == 0,
                        "FASTBALD_CUDA_PLAN: block must be a multiple of 32 in [32, ", kMaxBlock, "]");
      ov.block = static_cast<int>(n);
    } else if (k == "grid") {
      ov.max_grid = n;
    } else if (k == "args") {
      ov.force_args = static_cast<int>(n);
    } else if (k == "kk") {
      ov.force_kk = static_cast<int>(n);
    } else if (k == "lanes") {
      TORCH_CHECK_VALUE(n >= 1 && n <= 32 && (n & (n - 1)) == 0, "FASTBALD_CUDA_PLAN: lanes must be 1, 2, 4, 8, 16 or 32");
      ov.row_lanes = static_cast<int>(n);
    }
  }
  return ov;
}

// kernel<<<P.grid, P.block, P.smem, stream>>>(P), after raising the kernel's dynamic shared-memory
// limit when the plan needs more than the default 48 KB.
void launch_planned(void (*kernel)(const Params), const Params& P, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(P.grid)), block(static_cast<unsigned>(P.block));
  const size_t smem = static_cast<size_t>(P.smem);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, block, smem, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The item kernel for the runtime C (plan.h plans it for float/half/bf16 and 2 <= C <= kItemMaxC).
template <class S>
void launch_item(const Params& P, cudaStream_t stream) {
  if constexpr (sizeof(S) != 8) {
    switch (P.C) {
#define FB_ITEM_CASE(c)                           \
  case c:                                         \
    launch_planned(item_kernel<S, c>, P, stream); \
    return;
      FB_ITEM_CLASSES(FB_ITEM_CASE)
#undef FB_ITEM_CASE
      default:
        break;
    }
  }
  TORCH_CHECK(false, "fastbald::pool_scores: no item kernel for C = ", P.C);
}

// The strip kernel of the planned configuration (plan.h plans it for float/half/bf16 only).
template <class S>
void launch_strip(const Params& P, cudaStream_t stream) {
  if constexpr (sizeof(S) != 8) {
#define FB_STRIP_LAUNCH(nv, mode)                         \
  if (P.st_nv == nv && P.st_mode == mode) {               \
    launch_planned(strip_kernel<S, nv, mode>, P, stream); \
    return;                                               \
  }
    FB_STRIP_CONFIGS(FB_STRIP_LAUNCH)
#undef FB_STRIP_LAUNCH
  }
  TORCH_CHECK(false, "fastbald::pool_scores: no strip kernel for NV = ", P.st_nv, ", mode = ", P.st_mode);
}

template <class S, class A>
void launch(const Params& P, cudaStream_t stream) {
  if (P.path == kItemPath) {
    launch_item<S>(P, stream);
  } else if (P.path == kStripPath) {
    launch_strip<S>(P, stream);
  } else if (P.path == kTilePath) {
    launch_planned(tile_kernel<S, A>, P, stream);
  } else {
    launch_planned(stream_kernel<S, A>, P, stream);
  }
}

// Kernel-side storage type of a torch scalar type (c10::Half / c10::BFloat16 convert to float on
// the device through their own operators).
template <class scalar_t>
using Storage = scalar_t;

at::Tensor pool_scores_cuda(const at::Tensor& x, int64_t input_kind, int64_t metrics, bool check_finite,
                            double prob_tol) {
  check_pool_scores_args(x, input_kind, metrics, prob_tol);
  TORCH_CHECK_VALUE(x.is_cuda(), "fastbald::pool_scores (CUDA kernel): x is on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), T = x.size(1), C = x.size(2);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({math::kNumMetrics, N}, x.options().dtype(acc_type));
  if (N == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const DeviceLimits lim = device_limits(x.device().index());
  const PlanOverrides ov = overrides_from_env();

  Params P;
  std::memset(&P, 0, sizeof(P));
  P.N = N;
  P.T = T;
  P.C = C;
  P.sN = x.stride(0);
  P.sT = x.stride(1);
  P.sC = x.stride(2);
  P.kind = static_cast<int>(input_kind);
  P.metrics = static_cast<int>(metrics);
  P.check = check_finite ? 1 : 0;
  P.tol = prob_tol;
  at::Tensor flag;
  if (check_finite) {
    // The finite check reads the kernel's flag back on the host (to raise the error naming the first
    // bad item, like the CPU op), which a stream being captured into a CUDA graph cannot do: the
    // synchronisation would invalidate the capture with an opaque error. Say so before anything is
    // enqueued (the capture stays valid).
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "fastbald::pool_scores: check_finite=True cannot run while the CUDA stream is being captured into "
                "a graph (CUDA graphs, torch.compile(mode=\"reduce-overhead\")): the check reads a flag back to the "
                "host to name the first bad pool item. Pass check_finite=False inside the graph (an invalid item "
                "then scores NaN, but for its variation ratio) and validate the inputs outside it if needed.");
    flag = at::empty({1}, x.options().dtype(at::kLong));
    C10_CUDA_CHECK(cudaMemsetAsync(flag.data_ptr(), 0, sizeof(unsigned long long), stream));
    P.flag = reinterpret_cast<unsigned long long*>(flag.data_ptr());
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbald_pool_scores_cuda", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    P.x = x.const_data_ptr<scalar_t>();
    P.out = out.mutable_data_ptr<A>();
    std::string err;
    TORCH_CHECK_VALUE(make_plan(P, static_cast<int64_t>(sizeof(scalar_t)), static_cast<int64_t>(sizeof(A)), lim, ov,
                                &err),
                      "fastbald::pool_scores: ", err);
    launch<Storage<scalar_t>, A>(P, stream);
    if (check_finite) {
      unsigned long long v = 0;
      C10_CUDA_CHECK(cudaMemcpyAsync(&v, P.flag, sizeof(v), cudaMemcpyDeviceToHost, stream));
      C10_CUDA_CHECK(cudaStreamSynchronize(stream));
      if (v != 0) {
        const int64_t bad = static_cast<int64_t>(~0ull - v);
        const at::Tensor item = x.select(0, bad).cpu();
        report_bad_item<scalar_t>(item.const_data_ptr<scalar_t>(), bad, T, C, item.stride(0), item.stride(1),
                                  static_cast<int>(input_kind), prob_tol);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastbald

TORCH_LIBRARY_IMPL(fastbald, CUDA, m) {
  m.impl("pool_scores", &fastbald::cuda::pool_scores_cuda);
}
