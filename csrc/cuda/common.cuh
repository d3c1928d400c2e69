// What every fusedres CUDA file needs: element types and conversions, and the host-side
// stream / error / device-query helpers over torch's stable C shim.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
  __device__ static __forceinline__ __half from(double v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ static __forceinline__ __nv_bfloat16 from(double v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
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

inline int sm_count() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

// nullptr (an absent operand) counts as aligned.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

} // namespace fusedres::cuda
