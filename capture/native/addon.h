// Shared helpers for the bgsnap addon: every failing syscall becomes a JavaScript
// Error whose `code` is the errno name (EPERM, ENOSPC, ...) and whose message says
// which call failed on what, so callers can branch on code and users can read it.
#pragma once
#include <napi.h>
#include <string>

namespace bgsnap {

Napi::Error ErrnoError(Napi::Env env, int err, const std::string& what);

// Registration hooks, one per source file, called from addon.cc.
void InitFileOps(Napi::Env env, Napi::Object exports);
void InitCapture(Napi::Env env, Napi::Object exports);  // process capture (capture_js.cc)

}  // namespace bgsnap
