// A stream file read through memory mappings without the SIGBUS hazard
// (mapped_input.cc). A file truncated while mapped makes any read of a page
// past its new end raise SIGBUS, which by default kills the process. Reads of
// the mapping happen only inside guarded regions of plain C loops: the SIGBUS
// handler jumps out of such a region when the fault lies in a registered input
// mapping, and the caller reports "input truncated" instead. Any other SIGBUS
// goes to the previous handler, or kills as it would have.
#pragma once
#include <napi.h>

#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <string>

namespace bgsnap {

struct InputGuard {
  sigjmp_buf jb;
  uintptr_t fault;  // the faulting address, set by the handler before it jumps
};

// Usage, with nothing that has a destructor between sigsetjmp and GuardEnd:
//   InputGuard g;
//   if (sigsetjmp(g.jb, 0) != 0) { GuardEnd(); ...g.fault... }
//   GuardBegin(&g); <reads of the mapping> GuardEnd();
void GuardBegin(InputGuard* g);
void GuardEnd();

// Where addr lies in the input: its file offset and the file's descriptor, if
// addr is inside a registered mapping.
bool InputAt(uintptr_t addr, int64_t* fileOffset, int* fd);

// "the input file was truncated while being read: byte X is gone (the file now
// has N bytes)" for a fault (or EFAULT) at addr inside an input mapping.
std::string TruncatedMessage(uintptr_t addr);

// CRC-32 of p[0..n) continuing from crc; false (and *fault) when a page of a
// mapped input vanished under it.
bool GuardedCrc32(uint32_t crc, const uint8_t* p, size_t n, uint32_t* out, uintptr_t* fault);

// mapInput(fd, offset, length, populate): a read-only Buffer over that range of
// a regular file, registered for the guard; unmapped when collected.
Napi::Value MapInput(const Napi::CallbackInfo& info);

}  // namespace bgsnap
