// errno -> JavaScript Error with the errno name as `code` (errno_error.cc).
#pragma once
#include <napi.h>
#include <string>

namespace bgsnap {

Napi::Error ErrnoError(Napi::Env env, int err, const std::string& what);

}  // namespace bgsnap
