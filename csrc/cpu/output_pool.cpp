// Reused memory for large CPU outputs: see output_pool.h.
#include "output_pool.h"

#include "../tensors.h"

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <dlfcn.h>
#include <pthread.h>
#endif

namespace fusedres::cpu {

namespace {

constexpr int64_t kMinBytes = int64_t{1} << 20;
constexpr int64_t kGranule = int64_t{1} << 20;
constexpr std::size_t kAlignment = 64;  // as c10's CPU allocator

// torch_from_blob (torch/csrc/stable/c/shim.h, torch >= 2.11).
using FromBlob = AOTITorchError (*)(void* data, int64_t ndim, const int64_t* sizes, const int64_t* strides,
    int64_t storage_offset, int32_t dtype, int32_t device_type, int32_t device_index, AtenTensorHandle* ret,
    int32_t layout, const uint8_t* opaque_metadata, int64_t opaque_metadata_size,
    void (*deleter)(void* data, void* ctx), void* deleter_ctx);

FromBlob find_from_blob() {
#if defined(__linux__)
  // libtorch_cpu is loaded already (this library links it): look the symbol up in it.
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) {
    return nullptr;
  }
  auto fn = reinterpret_cast<FromBlob>(dlsym(lib, "torch_from_blob"));
  dlclose(lib);  // drops the reference RTLD_NOLOAD took; the library stays loaded
  return fn;
#else
  return nullptr;
#endif
}

int64_t capacity_from_env() {
  const char* v = std::getenv("FUSEDRES_CPU_POOL_MB");
  if (v == nullptr || *v == '\0') {
    return int64_t{1024} << 20;
  }
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  return (end == v || mb <= 0) ? 0 : static_cast<int64_t>(mb) << 20;
}

struct Block {
  void* data;
  int64_t bytes;
};

class Pool {
 public:
  Pool() : from_blob_(find_from_blob()), capacity_(from_blob_ ? capacity_from_env() : 0) {}
  // The same settings, nothing cached (no lookups: safe in a fork child handler).
  explicit Pool(const Pool& settings) : from_blob_(settings.from_blob_), capacity_(settings.capacity_) {}

  bool enabled() const { return capacity_ > 0; }

  int64_t capacity() const { return capacity_; }

  FromBlob from_blob() const { return from_blob_; }

  // A block of exactly `bytes` (a multiple of kGranule): a freed one, or a new one.
  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recently freed first
        if (it->bytes == bytes) {
          void* data = it->data;
          cached_ -= bytes;
          free_.erase(std::next(it).base());
          return data;
        }
      }
    }
    void* data = nullptr;
    if (posix_memalign(&data, kAlignment, static_cast<std::size_t>(bytes)) != 0) {
      return nullptr;
    }
    return data;
  }

  void give_back(void* data, int64_t bytes) {
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > capacity_) {
        evicted.push_back({data, bytes});
      } else {
        while (cached_ + bytes > capacity_) {
          evicted.push_back(free_.front());
          cached_ -= free_.front().bytes;
          free_.pop_front();
        }
        free_.push_back({data, bytes});
        cached_ += bytes;
      }
    }
    for (const Block& b : evicted) {  // outside the lock: unmapping a large block takes a while
      std::free(b.data);
    }
  }

  int64_t release() {
    std::deque<Block> all;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (const Block& b : all) {
      std::free(b.data);
    }
    return bytes;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  const FromBlob from_blob_;
  const int64_t capacity_;
  std::mutex mutex_;
  std::deque<Block> free_;  // least recently freed at the front
  int64_t cached_ = 0;
};

Pool* instance = nullptr;

#if defined(__linux__)
// A child of fork() starts with a fresh pool: the parent's mutex may have been held by another
// thread at the fork, and that thread does not exist in the child. The parent's cached blocks stay
// mapped in the child, unused (copy-on-write pages, never touched).
void fresh_pool_in_child() { instance = new Pool(*instance); }
#endif

Pool& pool() {
  // Never destroyed: tensors may be freed during exit.
  static Pool* first = [] {
    instance = new Pool();
#if defined(__linux__)
    pthread_atfork(nullptr, nullptr, &fresh_pool_in_child);
#endif
    return instance;
  }();
  (void)first;
  return *instance;
}

void return_block(void* data, void* ctx) {
  pool().give_back(data, static_cast<int64_t>(reinterpret_cast<intptr_t>(ctx)));
}

int64_t element_size(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Double:
      return 8;
    case ScalarType::Float:
      return 4;
    default:
      return 2;  // Half, BFloat16 (shim_dtype rejects anything else)
  }
}

}  // namespace

std::optional<Tensor> pooled_empty_strided(
    const int64_t* sizes, const int64_t* strides, int64_t ndim, ScalarType dtype) {
  Pool& p = pool();
  if (!p.enabled()) {
    return std::nullopt;
  }
  int64_t extent = 1;  // elements addressed: 1 + sum((size - 1) * stride)
  for (int64_t d = 0; d < ndim; ++d) {
    if (sizes[d] == 0) {
      return std::nullopt;
    }
    extent += (sizes[d] - 1) * strides[d];
  }
  const int64_t bytes = extent * element_size(dtype);
  if (bytes < kMinBytes) {
    return std::nullopt;
  }
  const int64_t rounded = (bytes + kGranule - 1) / kGranule * kGranule;
  const int32_t shim = shim_dtype(dtype);  // checks dtype before any memory is taken
  void* data = p.take(rounded);
  if (data == nullptr) {
    return std::nullopt;  // let torch's allocator try, and raise its out-of-memory error
  }
  AtenTensorHandle out = nullptr;
  const AOTITorchError err = p.from_blob()(data, ndim, sizes, strides, 0, shim, aoti_torch_device_type_cpu(), -1, &out,
      aoti_torch_layout_strided(), nullptr, 0, &return_block, reinterpret_cast<void*>(static_cast<intptr_t>(rounded)));
  if (err != AOTI_TORCH_SUCCESS) {
    p.give_back(data, rounded);
    return std::nullopt;
  }
  return Tensor(out);
}

int64_t release_pool() { return pool().release(); }

int64_t pool_capacity() { return pool().capacity(); }

int64_t pool_cached_bytes() { return pool().cached(); }

}  // namespace fusedres::cpu
