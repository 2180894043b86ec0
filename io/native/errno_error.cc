// errno -> JavaScript Error, shared by both native addons (the file operations
// and the capture engine): every failing syscall becomes an Error whose `code`
// is the errno name (EPERM, ENOSPC, ...) and whose message says which call
// failed on what, so callers can branch on code and users can read it.
#include "errno_error.h"

#include <cerrno>
#include <cstring>

namespace bgsnap {

static const char* ErrnoName(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case ENOSPC: return "ENOSPC";
    case ENOSYS: return "ENOSYS";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENOTTY: return "ENOTTY";
    case EDQUOT: return "EDQUOT";
    case ECHILD: return "ECHILD";
    case EFBIG: return "EFBIG";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ECANCELED: return "ECANCELED";
    case ENXIO: return "ENXIO";
    case EROFS: return "EROFS";
    case ESPIPE: return "ESPIPE";
    case EXDEV: return "EXDEV";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case E2BIG: return "E2BIG";
    case ENOEXEC: return "ENOEXEC";
    default: {
      const char* name = strerrorname_np(err);  // the rest (EPIPE, ECONNRESET, ...)
      return name ? name : "EUNKNOWN";
    }
  }
}

Napi::Error ErrnoError(Napi::Env env, int err, const std::string& what) {
  Napi::Error e = Napi::Error::New(env, what + ": " + strerror(err));
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, err));
  return e;
}

}  // namespace bgsnap
