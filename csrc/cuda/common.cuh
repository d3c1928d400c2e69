// What every fusedres CUDA file needs: element types and conversions, and the host-side
// stream / error / device-query helpers over torch's stable C shim.
#pragma once

#include "tensors.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace fusedres::cuda {

// Accumulation type: fp32 for every storage type except fp64.
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class A, class T>
__device__ __forceinline__ A to_acc(T v) {
  return static_cast<A>(to_float(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}

// Round-to-nearest-even conversion from the accumulation type; NaN and Inf are preserved.
// fp64 -> fp16/bf16 rounds through fp32, as eager does: c10::Half and c10::BFloat16 are built
// from a float, so a double is first rounded to fp32 (torch.tensor(1 + 2**-11 + 2**-40,
// dtype=torch.float64).half() is 1.0 in eager; a direct __double2half gives the next fp16).
template <class T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ static __forceinline__ float from(float v) { return v; }
  __device__ static __forceinline__ float from(double v) { return static_cast<float>(v); }
};
template <>
struct Cvt<double> {
  __device__ static __forceinline__ double from(float v) { return static_cast<double>(v); }
  __device__ static __forceinline__ double from(double v) { return v; }
};
template <>
struct Cvt<__half> {
  __device__ static __forceinline__ __half from(float v) { return __float2half_rn(v); }
  __device__ static __forceinline__ __half from(double v) { return __float2half_rn(static_cast<float>(v)); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ static __forceinline__ __nv_bfloat16 from(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
};

inline void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, "fusedres: ", what, ": ", cudaGetErrorString(err));
}

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// Kernels run on torch's current stream of the tensors' device.
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

// Per-process facts (a device's SM count, a kernel's occupancy) are looked up once per device
// and cached: each query is a driver call, on the path of every op call otherwise. Devices
// beyond the cache are queried every time (correct, only slower).
constexpr int kCachedDevices = 16;

// slot's value, computed by query() on first use (0 means not known yet; threads that race
// compute the same value).
template <class Query>
int cached(std::atomic<int>& slot, const Query& query) {
  int v = slot.load(std::memory_order_relaxed);
  if (v == 0) {
    v = query();
    slot.store(v, std::memory_order_relaxed);
  }
  return v;
}

// Streaming multiprocessors of `device`.
inline int sm_count(int device) {
  static std::atomic<int> cache[kCachedDevices];
  const auto query = [device] {
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    return sms > 0 ? sms : 1;
  };
  return device >= 0 && device < kCachedDevices ? cached(cache[device], query) : query();
}

// Resident blocks per SM (at least 1) of kKernel with `threads` threads per block and no dynamic
// shared memory, on `device`, which must be the current device (callers hold a DeviceGuard).
// The occupancy calculator counts whole warps (registers are allocated per warp), so the cache
// is keyed by warps per block.
template <auto kKernel>
int blocks_per_sm(int device, int threads) {
  constexpr int kMaxWarps = 32;  // 1024 threads
  static std::atomic<int> cache[kCachedDevices][kMaxWarps + 1];
  const auto query = [threads] {
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, threads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return n > 0 ? n : 1;
  };
  const int warps = (threads + 31) / 32;
  const bool cacheable = device >= 0 && device < kCachedDevices && warps <= kMaxWarps;
  return cacheable ? cached(cache[device][warps], query) : query();
}

// nullptr (an absent operand) counts as aligned.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Run-time element types (DtypeCode, tensors.h), for data touched once per channel or column
// (per-channel vectors, running statistics, parameter grads), where a switch costs less than
// more instantiations.

// Element i of p, exactly, as a double.
__device__ __forceinline__ double ld_any(const void* p, int code, int64_t i) {
  switch (code) {
    case kF64:
      return static_cast<const double*>(p)[i];
    case kF16:
      return static_cast<double>(__half2float(static_cast<const __half*>(p)[i]));
    case kBF16:
      return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    default:
      return static_cast<double>(static_cast<const float*>(p)[i]);
  }
}

// Stores v (float or double) as element i of p, converted to p's dtype as Cvt does.
template <class A>
__device__ __forceinline__ void st_any(void* p, int code, int64_t i, A v) {
  switch (code) {
    case kF64:
      static_cast<double*>(p)[i] = Cvt<double>::from(v);
      break;
    case kF16:
      static_cast<__half*>(p)[i] = Cvt<__half>::from(v);
      break;
    case kBF16:
      static_cast<__nv_bfloat16*>(p)[i] = Cvt<__nv_bfloat16>::from(v);
      break;
    default:
      static_cast<float*>(p)[i] = Cvt<float>::from(v);
  }
}

}  // namespace fusedres::cuda
