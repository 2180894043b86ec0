// Shared declarations of the capture addon (bgsnap.node: ptrace and userfaultfd).
// Failing syscalls become Errors with the errno name as `code` through
// ErrnoError, which it shares with the file-operations addon (io/native).
#pragma once
#include <napi.h>
#include <string>

#include "errno_error.h"  // io/native: ErrnoError

namespace bgsnap {

// Registration hooks, one per source file, called from addon.cc.
void InitCapture(Napi::Env env, Napi::Object exports);  // process capture (capture_js.cc)
void InitQemuUffd(Napi::Env env, Napi::Object exports);  // QEMU 7.2's forgotten write protection (qemu_uffd.cc)

}  // namespace bgsnap
