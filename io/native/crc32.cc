// CRC-32 at memory speed. The zlib linked into Node computes it 8 bytes at a
// time (~2 GB/s per core here), which made checksumming the receiver's largest
// cost after copying. PCLMULQDQ folds 64 bytes per step: four 128-bit lanes,
// each multiplied by x^(512±32) mod P and added to the next 64 bytes, then the
// lanes fold into one, 128 bits reduce to 64, then 32, and a Barrett step
// yields the remainder (Intel, "Fast CRC Computation for Generic Polynomials
// Using PCLMULQDQ", 2009). The constants below are those powers of x for the
// bit-reflected polynomial 0xEDB88320; test/crc32.test.ts checks the result
// against zlib for every length and alignment it tries.
#include "crc32.h"

#include <immintrin.h>

extern "C" unsigned long crc32(unsigned long crc, const unsigned char* buf, unsigned int len);  // zlib, exported by Node

namespace bgsnap {

namespace {

__attribute__((target("pclmul,sse4.1"))) inline __m128i Fold(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

__attribute__((target("pclmul,sse4.1"))) inline __m128i Load(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// The CRC register (not inverted) over len bytes, len >= 64 and a multiple of 16.
__attribute__((target("pclmul,sse4.1"))) uint32_t FoldCrc(uint32_t reg, const uint8_t* p, size_t len) {
  const __m128i k12 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);  // x^(4*128+32), x^(4*128-32) mod P
  const __m128i k34 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);  // x^(128+32), x^(128-32) mod P
  const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);             // x^64 mod P
  const __m128i poly = _mm_set_epi64x(0x1f7011641, 0x1db710641); // mu, P
  const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
  __m128i x0 = _mm_xor_si128(Load(p), _mm_cvtsi32_si128(int(reg)));
  __m128i x1 = Load(p + 16), x2 = Load(p + 32), x3 = Load(p + 48);
  for (p += 64, len -= 64; len >= 64; p += 64, len -= 64) {
    x0 = _mm_xor_si128(Fold(x0, k12), Load(p));
    x1 = _mm_xor_si128(Fold(x1, k12), Load(p + 16));
    x2 = _mm_xor_si128(Fold(x2, k12), Load(p + 32));
    x3 = _mm_xor_si128(Fold(x3, k12), Load(p + 48));
  }
  x0 = _mm_xor_si128(Fold(x0, k34), x1);
  x0 = _mm_xor_si128(Fold(x0, k34), x2);
  x0 = _mm_xor_si128(Fold(x0, k34), x3);
  for (; len >= 16; p += 16, len -= 16) x0 = _mm_xor_si128(Fold(x0, k34), Load(p));
  // 128 -> 64 bits
  x0 = _mm_xor_si128(_mm_clmulepi64_si128(x0, k34, 0x10), _mm_srli_si128(x0, 8));
  // 64 -> 32 bits
  x0 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x0, mask32), k5, 0x00), _mm_srli_si128(x0, 4));
  // Barrett reduction
  __m128i t = _mm_clmulepi64_si128(_mm_and_si128(x0, mask32), poly, 0x10);
  t = _mm_clmulepi64_si128(_mm_and_si128(t, mask32), poly, 0x00);
  return uint32_t(_mm_extract_epi32(_mm_xor_si128(t, x0), 1));
}

bool HavePclmul() {
  static const bool have = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return have;
}

}  // namespace

uint32_t Crc32(uint32_t crc, const uint8_t* buf, size_t len) {
  if (len >= 64 && HavePclmul()) {
    size_t n = len & ~size_t(15);
    crc = ~FoldCrc(~crc, buf, n);
    buf += n, len -= n;
  }
  while (len > 0) {  // the tail (and every byte without PCLMULQDQ) through zlib
    unsigned int n = len > (1u << 30) ? (1u << 30) : unsigned(len);
    crc = uint32_t(crc32(crc, buf, n));
    buf += n, len -= n;
  }
  return crc;
}

}  // namespace bgsnap
