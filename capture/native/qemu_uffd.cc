// QEMU 7.2's forgotten write protection (capture/qemu-uffd.ts says when this is
// used). QEMU before 8.1 stops write-protecting guest RAM only when a background
// snapshot completes (ram_write_tracking_stop() is called from
// bg_migration_completion() alone; upstream commit 3a8b81f2e6 moved it to
// bg_migration_iteration_finish()), so a snapshot that ends any other way leaves
// its userfaultfd open in QEMU with the RAM ranges still registered and
// protected, and nobody left to serve a fault: a vCPU, or QEMU's main thread
// holding the big lock, that writes an unsaved page sleeps for good.
//
// Two calls, each one syscall family, so that the policy stays in TypeScript:
//   peerPid(fd)                          SO_PEERCRED of a connected Unix socket
//   uffdRelease(pid, fd, ranges, unreg)  a copy of QEMU's fd `fd` by pidfd_getfd;
//       UFFDIO_WRITEPROTECT mode 0 (unprotect and wake the sleepers) over each
//       [start, length], then, if `unreg`, UFFDIO_UNREGISTER of it: exactly
//       what ram_write_tracking_stop() does before it closes the fd, which we
//       cannot do for QEMU (it still holds its own copy).
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include "addon.h"

namespace bgsnap {

static Napi::Value PeerPid(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  struct ucred cred {};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    ErrnoError(env, errno, "getsockopt(SO_PEERCRED) on fd " + std::to_string(fd)).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, cred.pid);
}

// A copy of `remote` from process `pid`; -1 with errno set and `what` naming the call.
static int TakeFd(int pid, int remote, std::string& what) {
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) return what = "pidfd_open(" + std::to_string(pid) + ")", -1;
  int fd = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, remote, 0));
  int saved = errno;
  close(pidfd);
  errno = saved;
  if (fd < 0) what = "pidfd_getfd of fd " + std::to_string(remote) + " in process " + std::to_string(pid);
  return fd;
}

static int Release(int uffd, uint64_t start, uint64_t length, bool unregister, std::string& what) {
  struct uffdio_writeprotect wp {};
  wp.range.start = start;
  wp.range.len = length;
  wp.mode = 0;  // neither _MODE_WP nor _MODE_DONTWAKE: unprotect and wake
  if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) return what = "UFFDIO_WRITEPROTECT (off)", -1;
  if (!unregister) return 0;
  struct uffdio_range r {};
  r.start = start;
  r.len = length;
  if (ioctl(uffd, UFFDIO_UNREGISTER, &r) != 0) return what = "UFFDIO_UNREGISTER", -1;
  return 0;
}

static Napi::Value UffdRelease(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int pid = info[0].As<Napi::Number>().Int32Value();
  int remote = info[1].As<Napi::Number>().Int32Value();
  Napi::Array ranges = info[2].As<Napi::Array>();
  bool unregister = info[3].As<Napi::Boolean>().Value();
  std::string what;
  int uffd = TakeFd(pid, remote, what);
  if (uffd < 0) {
    ErrnoError(env, errno, what).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  for (uint32_t i = 0; i < ranges.Length(); i++) {
    Napi::Array r = ranges.Get(i).As<Napi::Array>();
    uint64_t start = static_cast<uint64_t>(r.Get(0u).As<Napi::Number>().Int64Value());
    uint64_t length = static_cast<uint64_t>(r.Get(1u).As<Napi::Number>().Int64Value());
    if (Release(uffd, start, length, unregister, what) != 0) {
      int err = errno;
      close(uffd);
      char where[80];
      snprintf(where, sizeof where, " of 0x%llx+0x%llx", static_cast<unsigned long long>(start), static_cast<unsigned long long>(length));
      ErrnoError(env, err, what + where + " in process " + std::to_string(pid)).ThrowAsJavaScriptException();
      return env.Undefined();
    }
  }
  close(uffd);
  return env.Undefined();
}

void InitQemuUffd(Napi::Env env, Napi::Object exports) {
  exports.Set("peerPid", Napi::Function::New(env, PeerPid, "peerPid"));
  exports.Set("uffdRelease", Napi::Function::New(env, UffdRelease, "uffdRelease"));
}

}  // namespace bgsnap
