// The receiver's per-page work, off the JavaScript thread: for one batch of
// pages it checksums every data page once (checking the frame's CRC from the page
// CRCs when asked), tells all-zero pages from data, updates the block's
// present/data/discarded bitmaps, writes runs of consecutive data pages with one
// pwrite each and punches a hole where a page that held data became zero, in
// batch order, so the last version of a page wins. It runs on a libuv pool
// thread (AsyncWorker): a receiver holding many streams never waits on one
// stream's writes, and decoding the next frames overlaps this work.
// Nothing is written when the frame's checksum does not match.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <napi.h>

#include "crc32.h"
#include "errno_error.h"
#include "mapped_input.h"

// zlib as linked into Node (exported for addons), for combining CRCs.
extern "C" {
unsigned long crc32_combine_gen(long len2);
unsigned long crc32_combine_op(unsigned long crc1, unsigned long crc2, unsigned long op);
}

namespace bgsnap {

namespace {

struct Bits {
  uint8_t* p;
  bool get(uint32_t i) const { return (p[i >> 3] >> (i & 7)) & 1; }
  void set(uint32_t i) { p[i >> 3] |= uint8_t(1u << (i & 7)); }
  void clear(uint32_t i) { p[i >> 3] &= uint8_t(~(1u << (i & 7))); }
};

bool AllZero(const uint8_t* p, size_t n) {
  // Most data pages differ from zero in their first bytes: test those first.
  uint64_t head;
  memcpy(&head, p, sizeof head);
  if (head != 0) return false;
  uint64_t acc = 0;
  for (size_t o = 0; o < n; o += 64) {
    uint64_t w[8];
    memcpy(w, p + o, sizeof w);
    acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
    if (acc) return false;
  }
  return true;
}

// One batch. The JavaScript side keeps every array alive (and untouched) until
// the promise settles; the worker only reads and writes through these pointers.
struct Batch {
  int fd = -1;
  uint32_t pageSize = 0;
  int64_t base = 0;      // data-file offset of the block's page 0
  uint32_t pages = 0;    // pages in the block (bounds check)
  uint32_t n = 0;        // records in the batch
  const uint32_t* index = nullptr;
  const uint8_t* zero = nullptr;
  const uint8_t* data = nullptr;
  size_t dataLen = 0;
  Bits present{}, dataBits{}, discarded{};
  uint32_t* crcs = nullptr;  // out: CRC of each record that holds data
  uint8_t* isData = nullptr; // out: 1 where the record is stored as data
  bool check = false;
  uint32_t seed = 0, expected = 0;  // frame CRC before the pages, and as sent
};

// The batch's per-page reads: each data page's CRC (the frame's combined from
// them) and its zero test. Guarded (mapped_input.h): the pages may be a view of
// a mapped stream file that is truncated under us; then false and *fault.
// Plain C between sigsetjmp and GuardEnd: nothing with a destructor.
bool ScanPages(Batch& b, unsigned long op, unsigned long zeroCrc, unsigned long* frame, uintptr_t* fault) {
  InputGuard g;
  if (sigsetjmp(g.jb, 0) != 0) {
    GuardEnd();
    *fault = g.fault;
    return false;
  }
  GuardBegin(&g);
  unsigned long f = b.seed;
  for (uint32_t i = 0, d = 0; i < b.n; i++) {
    if (b.zero[i]) continue;
    const uint8_t* page = b.data + size_t(d++) * b.pageSize;
    bool z = AllZero(page, b.pageSize);
    b.isData[i] = z ? 0 : 1;
    unsigned long c = z ? zeroCrc : Crc32(0, page, b.pageSize);
    b.crcs[i] = uint32_t(c);
    f = crc32_combine_op(f, c, op);
  }
  GuardEnd();
  *frame = f;
  return true;
}

// Runs the batches in order; stops at the first whose checksum fails (nothing
// of it written) or whose write fails.
// The phases of a batch: checksum and zero test (scan: reads the pages, fills
// crcs and isData), then bitmaps, pwrites and holes (write: uses isData). One
// call may run both, or one: the receiver scans the next round while the
// previous one is written (receiver/page-queue.ts).
enum Phase { kBoth, kScan, kWrite };

class PageWriter : public Napi::AsyncWorker {
 public:
  PageWriter(Napi::Env env, std::vector<Batch> all, Napi::Object keep, Phase phase)
      : Napi::AsyncWorker(env), all_(std::move(all)), phase_(phase), deferred_(Napi::Promise::Deferred::New(env)) {
    keep_ = Napi::Persistent(keep);
  }
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    for (size_t k = 0; k < all_.size() && !err_; k++) {
      b_ = all_[k];
      if (phase_ != kWrite && !Checksum()) {
        badChecksum_ = double(k);
        return;
      }
      for (uint32_t i = 0, d = 0; phase_ != kScan && i < b_.n && !err_;) i = Record(i, d);
      if (truncated_) truncatedAt_ = double(k);
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_ && !truncated_) {
      deferred_.Reject(ErrnoError(env, err_, what_).Value());
      return;
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("badChecksum", Napi::Number::New(env, badChecksum_));
    r.Set("truncatedAt", Napi::Number::New(env, truncatedAt_));
    if (truncated_) r.Set("truncated", Napi::String::New(env, what_));
    r.Set("duplicates", Napi::Number::New(env, duplicates_));
    r.Set("zeroRecords", Napi::Number::New(env, zeroRecords_));
    deferred_.Resolve(r);
  }

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  // Per-page CRCs, and the frame's CRC combined from them (crc(A||B) needs only
  // crc(A), crc(B) and B's length), so each page is read once for both.
  // A truncated input fails the batch before anything of it is written.
  bool Checksum() {
    unsigned long frame = 0;
    uintptr_t fault = 0;
    if (!ScanPages(b_, crc32_combine_gen(b_.pageSize), ZeroCrc(), &frame, &fault)) {
      Truncated(fault);
      return true;
    }
    return !b_.check || uint32_t(frame) == b_.expected;
  }

  unsigned long ZeroCrc() {
    std::vector<uint8_t> z(b_.pageSize, 0);
    return Crc32(0, z.data(), b_.pageSize);
  }

  // Accounts record i; a data record starts a run of records whose pages follow
  // each other both in the block and in the payload, written with one pwrite.
  // Returns the next record; d is the payload page of record i.
  uint32_t Record(uint32_t i, uint32_t& d) {
    uint32_t page = b_.index[i];
    if (page >= b_.pages) return Fail(EINVAL, "page " + std::to_string(page) + " outside the block"), b_.n;
    if (!b_.isData[i]) {
      Account(page, false);
      if (!b_.zero[i]) d++;
      return i + 1;
    }
    uint32_t j = i + 1;
    while (j < b_.n && b_.isData[j] && b_.index[j] == b_.index[j - 1] + 1 && b_.index[j] < b_.pages) j++;
    Write(page, d, j - i);
    // Only written pages count: a run cut short (EFAULT from a truncated
    // input, ENOSPC) marks none of its pages present.
    for (uint32_t k = i; k < j && !err_; k++) Account(b_.index[k], true);
    d += j - i;
    return err_ ? b_.n : j;
  }

  void Account(uint32_t page, bool isData) {
    if (b_.present.get(page)) duplicates_++;
    b_.present.set(page);
    b_.discarded.clear(page);
    if (isData) return b_.dataBits.set(page);
    zeroRecords_++;
    if (!b_.dataBits.get(page)) return;
    b_.dataBits.clear(page);
    off_t off = b_.base + off_t(page) * b_.pageSize;
    if (fallocate(b_.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, b_.pageSize) != 0) Fail(errno, "fallocate(PUNCH_HOLE)");
  }

  void Write(uint32_t page, uint32_t d, uint32_t count) {
    const uint8_t* src = b_.data + size_t(d) * b_.pageSize;
    size_t len = size_t(count) * b_.pageSize;
    off_t off = b_.base + off_t(page) * b_.pageSize;
    while (len > 0 && !err_) {
      ssize_t w = pwrite(b_.fd, src, len, off);
      if (w < 0 && errno == EINTR) continue;
      int64_t at = 0;
      int inFd = -1;
      if (w < 0 && errno == EFAULT && InputAt(uintptr_t(src), &at, &inFd)) return Truncated(uintptr_t(src));
      if (w <= 0) return Fail(w < 0 ? errno : EIO, "pwrite of the image data file at byte " + std::to_string(off));
      src += w, len -= size_t(w), off += w;
    }
  }

  void Fail(int err, const std::string& what) {
    if (!err_) err_ = err, what_ = what;
  }

  // The mapped input lost the page at addr (a read faulted, or pwrite from it
  // gave EFAULT): the stream ends here, as it would with read() at the new end.
  void Truncated(uintptr_t addr) {
    if (err_) return;
    Fail(EFAULT, TruncatedMessage(addr));
    truncated_ = true;
  }

  std::vector<Batch> all_;
  Phase phase_;
  Batch b_;  // the batch being run
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference keep_;
  double badChecksum_ = -1;
  double truncatedAt_ = -1;  // the job whose input vanished (some of its runs may be written)
  double duplicates_ = 0, zeroRecords_ = 0;
  int err_ = 0;
  bool truncated_ = false;
  std::string what_;
};

template <typename T>
T* Array(Napi::Object o, const char* key, size_t minLen, size_t& len, bool& ok) {
  Napi::Value v = o.Get(key);
  if (!v.IsTypedArray()) return ok = false, nullptr;
  Napi::TypedArray a = v.As<Napi::TypedArray>();
  len = a.ByteLength() / sizeof(T);
  if (len < minLen) ok = false;
  return reinterpret_cast<T*>(static_cast<uint8_t*>(a.ArrayBuffer().Data()) + a.ByteOffset());
}

// Reads and checks the job's fields: every array must be as long as the batch
// and the bitmaps as long as the block, so the worker never reads past one.
bool ParseBatch(Napi::Object job, Batch& b) {
  bool ok = true;
  size_t len = 0, dataLen = 0;
  b.fd = job.Get("fd").As<Napi::Number>().Int32Value();
  b.pageSize = job.Get("pageSize").As<Napi::Number>().Uint32Value();
  b.base = job.Get("base").As<Napi::Number>().Int64Value();
  b.pages = job.Get("pages").As<Napi::Number>().Uint32Value();
  b.index = Array<uint32_t>(job, "index", 0, len, ok);
  b.n = uint32_t(len);
  b.zero = Array<uint8_t>(job, "zero", b.n, len, ok);
  b.data = Array<uint8_t>(job, "data", 0, dataLen, ok);
  size_t bitLen = (size_t(b.pages) + 7) / 8;
  b.present.p = Array<uint8_t>(job, "present", bitLen, len, ok);
  b.dataBits.p = Array<uint8_t>(job, "dataBits", bitLen, len, ok);
  b.discarded.p = Array<uint8_t>(job, "discarded", bitLen, len, ok);
  b.crcs = Array<uint32_t>(job, "crcs", b.n, len, ok);
  b.isData = Array<uint8_t>(job, "isData", b.n, len, ok);
  size_t dataPages = 0;
  for (uint32_t i = 0; ok && i < b.n; i++) dataPages += b.zero[i] ? 0 : 1;
  if (ok && (b.pageSize == 0 || dataLen != dataPages * b.pageSize)) ok = false;
  for (uint32_t i = 0; ok && i < b.n; i++) ok = b.index[i] < b.pages;
  Napi::Value check = job.Get("check");
  if (check.IsObject()) {
    b.check = true;
    b.seed = check.As<Napi::Object>().Get("seed").As<Napi::Number>().Uint32Value();
    b.expected = check.As<Napi::Object>().Get("expected").As<Napi::Number>().Uint32Value();
  }
  b.dataLen = dataLen;
  return ok;
}

}  // namespace

// writePages(jobs, phase?: 'scan' | 'write'): Promise<{badChecksum,
// truncatedAt, truncated?, duplicates, zeroRecords}>; see Batch and Phase.
// badChecksum is the index of the job whose frame checksum failed, or -1.
Napi::Value WritePages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<Batch> all;
  bool ok = info[0].IsArray();
  if (ok) {
    Napi::Array jobs = info[0].As<Napi::Array>();
    all.resize(jobs.Length());
    for (uint32_t k = 0; ok && k < jobs.Length(); k++) ok = jobs.Get(k).IsObject() && ParseBatch(jobs.Get(k).As<Napi::Object>(), all[k]);
  }
  if (!ok) {
    Napi::TypeError::New(env, "writePages: a batch's arrays do not match its page count, page size or block").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::string phase = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
  Phase ph = phase == "scan" ? kScan : phase == "write" ? kWrite : kBoth;
  if (ph != kWrite) {
    for (Batch& b : all) memset(b.isData, 0, b.n);
  }
  auto* w = new PageWriter(env, std::move(all), info[0].As<Napi::Object>(), ph);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

}  // namespace bgsnap
