// writeBehind: a streamed output file goes to the disk as it is written, and
// leaves the page cache once it is there.
//
// Why: a capture stream is written once and read later, if at all. Left to the
// page cache, a 1 GB stream takes 1 GB of memory from the machine (evicting the
// target's own file cache), is written back whenever the kernel chooses (after
// bgsnap exited 0: an EIO or ENOSPC then is seen by nobody), and on a guest
// whose free memory goes back to its host each new page-cache page costs a
// fault in the host: 1 GB took 1.5-1.7 s of system time there, against 0.5 s
// for the same bytes written behind in 8 MiB windows (fsync included; io/
// output.ts has the measurement).
#include <fcntl.h>
#include <unistd.h>

#include <napi.h>

#include "errno_error.h"

namespace bgsnap {
namespace {

class WriteBehind : public Napi::AsyncWorker {
 public:
  WriteBehind(Napi::Env env, int fd, const int64_t (&r)[4])
      : Napi::AsyncWorker(env), fd_(fd), dropFrom_(r[0]), dropTo_(r[1]), writeFrom_(r[2]), writeTo_(r[3]),
        deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

  // [writeFrom, writeTo): its write to the disk starts. [dropFrom, dropTo): on
  // the disk before this returns (a failed write back is seen here), then out
  // of the page cache. Either may be empty. Only this pool thread waits.
  void Execute() override {
    const unsigned wait = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (writeTo_ > writeFrom_ && sync_file_range(fd_, writeFrom_, writeTo_ - writeFrom_, SYNC_FILE_RANGE_WRITE) != 0) {
      err_ = errno, what_ = "sync_file_range(WRITE)";
    } else if (dropTo_ > dropFrom_ && sync_file_range(fd_, dropFrom_, dropTo_ - dropFrom_, wait) != 0) {
      err_ = errno, what_ = "sync_file_range(WAIT)";
    } else if (dropTo_ > dropFrom_) {
      // Only a hint: a page still dirty or mapped stays; the data is on disk.
      posix_fadvise(fd_, dropFrom_, dropTo_ - dropFrom_, POSIX_FADV_DONTNEED);
    }
  }

  void OnOK() override {
    if (err_) deferred_.Reject(ErrnoError(Env(), err_, what_).Value());
    else deferred_.Resolve(Env().Undefined());
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  int fd_;
  int64_t dropFrom_, dropTo_, writeFrom_, writeTo_;
  Napi::Promise::Deferred deferred_;
  int err_ = 0;
  const char* what_ = "";
};

}  // namespace

// writeBehind(fd, dropFrom, dropTo, writeFrom, writeTo): Promise<void>; see
// WriteBehind::Execute.
// Errors (EIO, ENOSPC: what a plain write leaves to a later fsync) reject with
// the errno name as code.
Napi::Value WriteBehindJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t r[4];
  for (int i = 0; i < 4; i++) r[i] = info[i + 1].As<Napi::Number>().Int64Value();
  if (r[0] < 0 || r[1] < r[0] || r[2] < 0 || r[3] < r[2]) {
    Napi::RangeError::New(env, "writeBehind: want two ranges, 0 <= from <= to").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  auto* w = new WriteBehind(env, fd, r);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

}  // namespace bgsnap
