// File operations Node's fs lacks and the image needs: punching a hole where a
// page became zero (so zero pages never occupy disk) and asking which ranges of a
// sparse file hold data (so converters skip holes without reading them).
// Its own small addon (bgsnap_fileops.node): the receiver, convert and inspect
// load this one only, never the ptrace/userfaultfd capture engine.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>

#include <napi.h>

#include "crc32.h"
#include "errno_error.h"
#include "mapped_input.h"

namespace bgsnap {

// punchHole(fd, offset, length): deallocate the range, keeping the file size.
static Napi::Value PunchHole(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t off = info[1].As<Napi::Number>().Int64Value();
  int64_t len = info[2].As<Napi::Number>().Int64Value();
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) != 0) {
    ErrnoError(env, errno, "fallocate(PUNCH_HOLE)").ThrowAsJavaScriptException();
  }
  return env.Undefined();
}

// seekData(fd, offset): next offset >= offset that holds data, or -1 past the end.
static Napi::Value SeekData(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t off = info[1].As<Napi::Number>().Int64Value();
  off_t r = lseek(fd, off, SEEK_DATA);
  if (r < 0 && errno != ENXIO) {
    ErrnoError(env, errno, "lseek(SEEK_DATA)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, r < 0 ? -1.0 : static_cast<double>(r));
}

// seekHole(fd, offset): next offset >= offset that is a hole (or the file end).
static Napi::Value SeekHole(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t off = info[1].As<Napi::Number>().Int64Value();
  off_t r = lseek(fd, off, SEEK_HOLE);
  if (r < 0) {
    ErrnoError(env, errno, "lseek(SEEK_HOLE)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

// setPipeSize(fd, bytes): grow a pipe's buffer (F_SETPIPE_SZ); returns the size
// the kernel granted, or 0 when fd is not a pipe. A 64 KiB pipe makes a capture
// and its receiver take turns; a larger one lets both run at once.
static Napi::Value SetPipeSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int want = info[1].As<Napi::Number>().Int32Value();
  int got = fcntl(fd, F_SETPIPE_SZ, want);
  if (got < 0 && errno == EPERM) got = fcntl(fd, F_GETPIPE_SZ);  // over pipe-max-size
  if (got < 0 && errno != EBADF && errno != EINVAL) {
    ErrnoError(env, errno, "fcntl(F_SETPIPE_SZ)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, got < 0 ? 0 : got);
}

// crc32(buf, crc = 0): zlib's CRC-32 at memory speed (crc32.cc), for page
// checksums outside the receiver's batches and for the test against zlib.
static Napi::Value Crc32Js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::TypedArray a = info[0].As<Napi::TypedArray>();
  uint32_t crc = info.Length() > 1 ? info[1].As<Napi::Number>().Uint32Value() : 0;
  const uint8_t* p = static_cast<const uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset();
  // Guarded: buf may be a view of a mapped input file someone truncates.
  uint32_t out = 0;
  uintptr_t fault = 0;
  if (!GuardedCrc32(crc, p, a.ByteLength(), &out, &fault)) {
    Napi::Error e = Napi::Error::New(env, TruncatedMessage(fault));
    e.Set("code", Napi::String::New(env, "INPUT_TRUNCATED"));
    e.ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, out);
}

// tell(fd): the file position (lseek SEEK_CUR), e.g. of a stdin file someone
// already read part of.
static Napi::Value Tell(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  off_t r = lseek(info[0].As<Napi::Number>().Int32Value(), 0, SEEK_CUR);
  if (r < 0) {
    ErrnoError(env, errno, "lseek(SEEK_CUR)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(r));
}

// One step of copyRange: copy_file_range while the kernel can, else (EXDEV,
// a file system without it) pread/pwrite through buf from then on.
static ssize_t CopyStep(int in, loff_t* offIn, int out, loff_t* offOut, int64_t left, bool* kernel, std::string* buf) {
  if (*kernel) {
    ssize_t n = copy_file_range(in, offIn, out, offOut, static_cast<size_t>(std::min<int64_t>(left, 1 << 30)), 0);
    if (n >= 0 || (errno != EXDEV && errno != ENOSYS && errno != EOPNOTSUPP && errno != EINVAL)) return n;
    *kernel = false;
  }
  buf->resize(1 << 20);
  ssize_t n = pread(in, buf->data(), static_cast<size_t>(std::min<int64_t>(left, 1 << 20)), *offIn);
  if (n > 0 && pwrite(out, buf->data(), n, *offOut) != n) return -1;
  if (n > 0) *offIn += n, *offOut += n;
  return n;
}

// copyRange(fdIn, offIn, fdOut, offOut, length): copies a byte range between
// files in the kernel (copy_file_range: a reflink where the file system shares
// extents, else a copy that never passes through user space), so converters
// need not read pages they only move. Returns the bytes copied (short only at
// the input's end).
static Napi::Value CopyRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int in = info[0].As<Napi::Number>().Int32Value();
  loff_t offIn = info[1].As<Napi::Number>().Int64Value();
  int out = info[2].As<Napi::Number>().Int32Value();
  loff_t offOut = info[3].As<Napi::Number>().Int64Value();
  int64_t left = info[4].As<Napi::Number>().Int64Value(), done = 0;
  bool kernel = true;
  std::string buf;
  while (left > 0) {
    ssize_t n = CopyStep(in, &offIn, out, &offOut, left, &kernel, &buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ErrnoError(env, errno, kernel ? "copy_file_range" : "pread/pwrite").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    if (n == 0) break;  // the input ended
    done += n;
    left -= n;
  }
  return Napi::Number::New(env, static_cast<double>(done));
}

Napi::Value WritePages(const Napi::CallbackInfo& info);  // pagewrite.cc
void InitFeed(Napi::Env env, Napi::Object exports);     // feed.cc
Napi::Value WriteBehindJs(const Napi::CallbackInfo& info);  // write_behind.cc

Napi::Object InitFileOps(Napi::Env env, Napi::Object exports) {
  exports.Set("tell", Napi::Function::New(env, Tell, "tell"));
  exports.Set("crc32", Napi::Function::New(env, Crc32Js, "crc32"));
  exports.Set("mapInput", Napi::Function::New(env, MapInput, "mapInput"));
  exports.Set("writePages", Napi::Function::New(env, WritePages, "writePages"));
  exports.Set("setPipeSize", Napi::Function::New(env, SetPipeSize, "setPipeSize"));
  exports.Set("punchHole", Napi::Function::New(env, PunchHole, "punchHole"));
  exports.Set("seekData", Napi::Function::New(env, SeekData, "seekData"));
  exports.Set("seekHole", Napi::Function::New(env, SeekHole, "seekHole"));
  exports.Set("copyRange", Napi::Function::New(env, CopyRange, "copyRange"));
  exports.Set("writeBehind", Napi::Function::New(env, WriteBehindJs, "writeBehind"));
  InitFeed(env, exports);
  return exports;
}

}  // namespace bgsnap

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  return bgsnap::InitFileOps(env, exports);
}

NODE_API_MODULE(bgsnap_fileops, Init)
