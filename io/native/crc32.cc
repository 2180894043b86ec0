// CRC-32 at memory speed. The zlib linked into Node computes it 8 bytes at a
// time (~2 GB/s per core here), which made checksumming the receiver's largest
// cost after copying. PCLMULQDQ folds 64 bytes per step: four 128-bit lanes,
// each multiplied by x^(512±32) mod P and added to the next 64 bytes, then the
// lanes fold into one, 128 bits reduce to 64, then 32, and a Barrett step
// yields the remainder (Intel, "Fast CRC Computation for Generic Polynomials
// Using PCLMULQDQ", 2009). The constants below are those powers of x for the
// bit-reflected polynomial 0xEDB88320. With VPCLMULQDQ (AVX-512) the same
// folding runs 16 lanes wide, 256 bytes per step (Fold256): the capture's saver
// checksums every page it reads on its own thread. test/crc32.test.ts checks
// the result against zlib for every length and alignment it tries.
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

struct Lanes {
  __m128i x0, x1, x2, x3;  // four 128-bit lanes, each 512 bits from the next 64 bytes
};

// The lanes over the first 64 bytes (with reg, the register so far), then
// folded 64 bytes at a time: *p and *len advance past what was taken.
__attribute__((target("pclmul,sse4.1"))) Lanes Fold64(uint32_t reg, const uint8_t** p, size_t* len) {
  const __m128i k12 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);  // x^(4*128+32), x^(4*128-32) mod P
  const uint8_t* q = *p;
  Lanes l{_mm_xor_si128(Load(q), _mm_cvtsi32_si128(int(reg))), Load(q + 16), Load(q + 32), Load(q + 48)};
  size_t n = *len - 64;
  for (q += 64; n >= 64; q += 64, n -= 64) {
    l.x0 = _mm_xor_si128(Fold(l.x0, k12), Load(q));
    l.x1 = _mm_xor_si128(Fold(l.x1, k12), Load(q + 16));
    l.x2 = _mm_xor_si128(Fold(l.x2, k12), Load(q + 32));
    l.x3 = _mm_xor_si128(Fold(l.x3, k12), Load(q + 48));
  }
  *p = q, *len = n;
  return l;
}

// The same lanes with VPCLMULQDQ: 16 lanes (4 x 512 bits) fold 256 bytes per
// step, by x^(2048+-32); then they fold into 4 lanes by x^(512+-32), as
// Fold64 holds them. Constants: reflect(x^n mod P) << 1, as the ones above.
__attribute__((target("avx512f,vpclmulqdq"))) inline __m512i Fold512(__m512i x, __m512i k) {
  return _mm512_xor_si512(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11));
}

__attribute__((target("avx512f"))) inline __m512i load(const uint8_t* a) {
  return _mm512_loadu_si512(a);
}

__attribute__((target("avx512f,vpclmulqdq"))) Lanes Fold256(uint32_t reg, const uint8_t** p, size_t* len) {
  // The same pair in every lane (set, not broadcast: GCC 12's broadcast warns in its own header).
  const __m512i k2048 = _mm512_set_epi64(0x1322d1430, 0x11542778a, 0x1322d1430, 0x11542778a, 0x1322d1430, 0x11542778a,
                                         0x1322d1430, 0x11542778a);
  const __m512i k512 = _mm512_set_epi64(0x1c6e41596, 0x154442bd4, 0x1c6e41596, 0x154442bd4, 0x1c6e41596, 0x154442bd4,
                                        0x1c6e41596, 0x154442bd4);
  const uint8_t* q = *p;
  __m512i z0 = _mm512_xor_si512(load(q), _mm512_zextsi128_si512(_mm_cvtsi32_si128(int(reg))));
  __m512i z1 = load(q + 64), z2 = load(q + 128), z3 = load(q + 192);
  size_t n = *len - 256;
  for (q += 256; n >= 256; q += 256, n -= 256) {
    z0 = _mm512_xor_si512(Fold512(z0, k2048), load(q));
    z1 = _mm512_xor_si512(Fold512(z1, k2048), load(q + 64));
    z2 = _mm512_xor_si512(Fold512(z2, k2048), load(q + 128));
    z3 = _mm512_xor_si512(Fold512(z3, k2048), load(q + 192));
  }
  z0 = _mm512_xor_si512(Fold512(z0, k512), z1);
  z0 = _mm512_xor_si512(Fold512(z0, k512), z2);
  z0 = _mm512_xor_si512(Fold512(z0, k512), z3);
  for (; n >= 64; q += 64, n -= 64) z0 = _mm512_xor_si512(Fold512(z0, k512), load(q));
  *p = q, *len = n;
  alignas(64) __m128i lane[4];
  _mm512_store_si512(lane, z0);
  return {lane[0], lane[1], lane[2], lane[3]};
}

bool HaveVpclmul() {
  static const bool have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
  return have;
}

// The CRC register (not inverted) over len bytes, len >= 64 and a multiple of 16.
__attribute__((target("pclmul,sse4.1"))) uint32_t FoldCrc(uint32_t reg, const uint8_t* p, size_t len) {
  const __m128i k34 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);  // x^(128+32), x^(128-32) mod P
  const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124);             // x^64 mod P
  const __m128i poly = _mm_set_epi64x(0x1f7011641, 0x1db710641); // mu, P
  const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
  Lanes l = len >= 256 && HaveVpclmul() ? Fold256(reg, &p, &len) : Fold64(reg, &p, &len);
  __m128i x0 = _mm_xor_si128(Fold(l.x0, k34), l.x1);
  x0 = _mm_xor_si128(Fold(x0, k34), l.x2);
  x0 = _mm_xor_si128(Fold(x0, k34), l.x3);
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
