// csrc/philox.h on its own, for tests/test_philox.py: reads one request per line from stdin and
// prints the 32-bit words it asks for in hex, one line per request.
//   block c0 c1 c2 c3 k0 k1     philox4x32_10 of that counter and key (hex words)
//   <fn> seed offset start n    bits(e) for e in [start, start + n) (seed, offset: decimal uint64)
// with <fn> one of: at (bits_at per element), fill (fill_bits from a baseline-ISA function),
// fill_avx2 (fill_bits from a function compiled for AVX2, as cpu/isa_dispatch.h builds kernels),
// plain (the plain vectorizable loop alone, from an aligned start), run8 (bits_run<8> per 8
// elements; n a multiple of 8).
#include "philox.h"

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace fusedres::philox;

namespace {

void fill_baseline(Key key, uint64_t offset, int64_t start, int64_t n, uint32_t* out) {
  fill_bits(key, offset, start, n, out);
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
void fill_avx2_build(Key key, uint64_t offset, int64_t start, int64_t n, uint32_t* out) {
  fill_bits(key, offset, start, n, out);
}
#pragma GCC pop_options
#else
void fill_avx2_build(Key key, uint64_t offset, int64_t start, int64_t n, uint32_t* out) {
  fill_bits(key, offset, start, n, out);
}
#endif

void print_words(const uint32_t* w, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    std::printf(i ? " %08" PRIx32 : "%08" PRIx32, w[i]);
  }
  std::printf("\n");
}

} // namespace

int main() {
  char fn[16];
  while (std::scanf("%15s", fn) == 1) {
    if (std::strcmp(fn, "block") == 0) {
      uint32_t c[4], k[2];
      if (std::scanf("%" SCNx32 " %" SCNx32 " %" SCNx32 " %" SCNx32 " %" SCNx32 " %" SCNx32, &c[0], &c[1], &c[2],
                     &c[3], &k[0], &k[1]) != 6) {
        return 2;
      }
      const Block b = philox4x32_10(c[0], c[1], c[2], c[3], Key{k[0], k[1]});
      print_words(b.v, 4);
      continue;
    }
    uint64_t seed = 0, offset = 0;
    int64_t start = 0, n = 0;
    if (std::scanf("%" SCNu64 " %" SCNu64 " %" SCNd64 " %" SCNd64, &seed, &offset, &start, &n) != 4 || n < 0) {
      return 2;
    }
    const Key key = key_of(seed);
    std::vector<uint32_t> out(static_cast<size_t>(n) + 1);
    if (std::strcmp(fn, "at") == 0) {
      for (int64_t i = 0; i < n; ++i) {
        out[i] = bits_at(key, offset, static_cast<uint64_t>(start + i));
      }
    } else if (std::strcmp(fn, "fill") == 0) {
      fill_baseline(key, offset, start, n, out.data());
    } else if (std::strcmp(fn, "fill_avx2") == 0) {
      fill_avx2_build(key, offset, start, n, out.data());
    } else if (std::strcmp(fn, "run8") == 0 && n % 8 == 0) {
      for (int64_t i = 0; i < n; i += 8) {
        uint32_t run[8];
        bits_run<8>(key, offset, static_cast<uint64_t>(start + i), run);
        std::memcpy(out.data() + i, run, sizeof(run));
      }
    } else if (std::strcmp(fn, "plain") == 0 && start % 4 == 0 && n % 4 == 0) {
      detail::fill_blocks_plain(key, offset + static_cast<uint64_t>(start / 4), n / 4, out.data());
    } else {
      return 2;
    }
    print_words(out.data(), n);
  }
  return 0;
}
