// CRC-32 (IEEE 802.3, as zlib computes it) with the CPU's carry-less multiply
// when it has one (crc32.cc).
#pragma once
#include <cstddef>
#include <cstdint>

namespace bgsnap {

// zlib's crc32(crc, buf, len): crc is the checksum so far (0 to start).
uint32_t Crc32(uint32_t crc, const uint8_t* buf, size_t len);

}  // namespace bgsnap
