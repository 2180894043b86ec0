// The `bgsnap-convert --to qemu -o -` feed into a pipe without copying pages:
// each data page goes from the image's page cache into the pipe by reference
// (vmsplice of a read-only shared mapping of the data file), between record
// headers that also go in by reference. The reader (QEMU) then makes the only
// copy. A pread-and-write feed copies every page twice more on this side.
//
// Kernel facts this relies on (checked on 6.18 by a test, test/qemu-feed.test.ts):
// - vmsplice without SPLICE_F_GIFT puts references to the user pages in the
//   pipe, not copies: memory must not change until the reader consumed it. So
//   the headers are written into fresh anonymous pages that are unmapped, never
//   reused; the pipe's references keep those pages, and their content, alive.
//   A reused header buffer could be rewritten while a reader that splices our
//   pipe onward (pv does) still holds its pages.
// - Image pages are the data file's page cache; munmap after the vmsplice
//   leaves the pipe's references valid. The mapping is never touched from user
//   space, so a data file truncated meanwhile cannot raise SIGBUS: the kernel's
//   page pinning fails with EFAULT instead, reported as an error.
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <napi.h>

#include "errno_error.h"

namespace bgsnap {

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMaxIov = 1024;  // UIO_MAXIOV

// Waits until fd takes more bytes: stdout may have been left non-blocking
// (O_NONBLOCK belongs to the open file, which a parent may share).
bool WaitWritable(int fd) {
  struct pollfd p = {fd, POLLOUT, 0};
  while (poll(&p, 1, -1) < 0) {
    if (errno != EINTR) return false;
  }
  return true;
}

// vmsplices every iovec, advancing past what each call took (a call returns
// short once the pipe is full). Returns 0 or the errno.
int SpliceAll(int fd, std::vector<struct iovec>& v) {
  size_t k = 0;
  while (k < v.size()) {
    size_t n = v.size() - k < kMaxIov ? v.size() - k : kMaxIov;
    ssize_t got = vmsplice(fd, &v[k], n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && errno == EAGAIN) {
      if (!WaitWritable(fd)) return errno;
      continue;
    }
    if (got < 0) return errno;
    size_t left = static_cast<size_t>(got);
    while (left > 0 && left >= v[k].iov_len) left -= v[k++].iov_len;
    if (left > 0) {
      v[k].iov_base = static_cast<char*>(v[k].iov_base) + left;
      v[k].iov_len -= left;
    }
  }
  return 0;
}

// A private copy of bytes in fresh anonymous pages, for vmsplice (see above).
void* FreshCopy(const uint8_t* p, size_t n) {
  void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  memcpy(m, p, n);
  return m;
}

// The record headers as iovecs between the pages: heads holds one header per
// page, the first `first` bytes long (it may name the block), the others 8;
// page i is at index[i] pages into the mapped window.
std::vector<struct iovec> Interleave(char* heads, size_t first, char* window, const uint32_t* index, size_t count) {
  std::vector<struct iovec> v;
  v.reserve(2 * count);
  for (size_t i = 0; i < count; i++) {
    size_t at = i == 0 ? 0 : first + (i - 1) * 8;
    v.push_back({heads + at, i == 0 ? first : 8});
    v.push_back({window + size_t(index[i]) * kPage, kPage});
  }
  return v;
}

// One call's work: n pages at index[i] of a window of the data file, each
// after its header (heads: the first `first` bytes long, the others 8).
struct Window {
  int out, data;
  int64_t offset;
  size_t pages;
  const uint32_t* index;
  size_t n;
  const uint8_t* heads;
  size_t headBytes;
};

// Maps the window (without populating it: its holes, zero pages, would become
// page-cache pages), splices the records, unmaps. Returns 0 or the errno,
// with what failed in *what.
int SpliceWindow(const Window& w, std::string* what) {
  void* h = FreshCopy(w.heads, w.headBytes);
  if (!h) {
    int e = errno;  // before the string's allocation may change it
    *what = "mmap of record headers";
    return e;
  }
  // Pages that are not cached yet would be read one fault at a time (a
  // mapping's read-around, synchronous), where pread's readahead streams:
  // 2x slower than the copying writer from a cold cache. So ask for this
  // window and the next one ahead, asynchronously.
  posix_fadvise(w.data, w.offset, 2 * w.pages * kPage, POSIX_FADV_WILLNEED);
  void* m = mmap(nullptr, w.pages * kPage, PROT_READ, MAP_SHARED, w.data, w.offset);
  int err = m == MAP_FAILED ? errno : 0;  // read before the string below allocates
  *what = "mmap of the image's data file at " + std::to_string(w.offset);
  if (!err) {
    std::vector<struct iovec> v = Interleave(static_cast<char*>(h), w.headBytes - (w.n - 1) * 8, static_cast<char*>(m), w.index, w.n);
    err = SpliceAll(w.out, v);
    *what = "vmsplice of " + std::to_string(w.n) + " pages from data offset " + std::to_string(w.offset) + " into fd " + std::to_string(w.out);
    munmap(m, w.pages * kPage);
  }
  munmap(h, w.headBytes);
  return err;
}

}  // namespace

// feedPages(outFd, dataFd, offset, windowPages, index, heads): PAGE records
// into the pipe outFd for the pages at index[i] (ascending) of the window of
// windowPages pages at offset of dataFd; page i's header is the i-th of heads
// (the first heads.length - 8*(n-1) bytes, the others 8). offset must be page
// aligned. Throws with the errno as code.
static Napi::Value FeedPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Uint32Array index = info[4].As<Napi::Uint32Array>();
  Napi::Uint8Array heads = info[5].As<Napi::Uint8Array>();
  Window w = {info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().Int32Value(),
              info[2].As<Napi::Number>().Int64Value(), info[3].As<Napi::Number>().Uint32Value(),
              index.Data(), index.ElementLength(), heads.Data(), heads.ByteLength()};
  if (w.n == 0 || w.offset % kPage != 0 || w.headBytes < w.n * 8 || index[w.n - 1] >= w.pages) {
    Napi::RangeError::New(env, "feedPages: need a page-aligned offset, pages inside the window and 8 header bytes per page").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string what;
  int err = SpliceWindow(w, &what);
  if (err) ErrnoError(env, err, what).ThrowAsJavaScriptException();
  return env.Undefined();
}

// writeAll(fd, buf): write(2) until all of buf is written, waiting while a
// non-blocking fd is full. For the stream's small parts around the pages.
static Napi::Value WriteAll(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  Napi::Uint8Array b = info[1].As<Napi::Uint8Array>();
  size_t done = 0;
  while (done < b.ByteLength()) {
    ssize_t n = write(fd, b.Data() + done, b.ByteLength() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN && WaitWritable(fd)) continue;
    if (n < 0) {
      ErrnoError(env, errno, "write to fd " + std::to_string(fd)).ThrowAsJavaScriptException();
      return env.Undefined();
    }
    done += static_cast<size_t>(n);
  }
  return env.Undefined();
}

// isPipe(fd): whether fd is a pipe (FIFO), the only thing vmsplice writes to.
static Napi::Value IsPipe(const Napi::CallbackInfo& info) {
  struct stat st;
  int fd = info[0].As<Napi::Number>().Int32Value();
  return Napi::Boolean::New(info.Env(), fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode));
}

void InitFeed(Napi::Env env, Napi::Object exports) {
  exports.Set("feedPages", Napi::Function::New(env, FeedPages, "feedPages"));
  exports.Set("writeAll", Napi::Function::New(env, WriteAll, "writeAll"));
  exports.Set("isPipe", Napi::Function::New(env, IsPipe, "isPipe"));
}

}  // namespace bgsnap
