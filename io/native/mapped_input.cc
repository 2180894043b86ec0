// Input mappings and the SIGBUS guard (see mapped_input.h for the scheme).
// The receiver maps its stream file so the page writer checksums, zero-tests
// and pwrites pages straight from the page cache (no read() copy). JavaScript
// never reads these mappings: the receiver reads frame headers with pread and
// hands only the data pages, as views, to the page writer, whose reads run
// guarded; pwrite from a vanished page fails with EFAULT, not a signal.
#include "mapped_input.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>

#include "crc32.h"
#include "errno_error.h"

namespace bgsnap {

namespace {

// Registered mappings, read by the signal handler: fixed slots of atomics, no
// locks and no allocation on the handler's path. lo == 0 marks a free slot.
constexpr int kSlots = 256;
struct Slot {
  std::atomic<uintptr_t> lo{0}, hi{0};
  std::atomic<int64_t> offset{0};
  std::atomic<int> fd{-1};
};
Slot g_slots[kSlots];

// initial-exec: reading it in the handler must not allocate (a dlopen'ed
// module's TLS is otherwise reached through __tls_get_addr, which may).
thread_local InputGuard* t_guard __attribute__((tls_model("initial-exec"))) = nullptr;

struct sigaction g_previous;
std::once_flag g_installed;

// Not ours: what would have happened without us. A handler that was there
// before runs; otherwise the default action (for a fault: the access repeats
// and the kernel kills with SIGBUS, with a core as before).
void Chain(int sig, siginfo_t* si, void* ctx) {
  if ((g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_sigaction) return g_previous.sa_sigaction(sig, si, ctx);
  if (!(g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    return g_previous.sa_handler(sig);
  }
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(SIGBUS, &dfl, nullptr);
  if (si->si_code <= 0) raise(SIGBUS);  // sent, not a fault: deliver it again, now fatal
}

int Find(uintptr_t addr) {
  for (int i = 0; i < kSlots; i++) {
    uintptr_t lo = g_slots[i].lo.load(std::memory_order_acquire);
    if (lo != 0 && addr >= lo && addr < g_slots[i].hi.load(std::memory_order_relaxed)) return i;
  }
  return -1;
}

// Only a fault (si_code > 0) at an address of an input mapping, on a thread
// inside a guarded region, is ours.
void OnSigbus(int sig, siginfo_t* si, void* ctx) {
  InputGuard* g = t_guard;
  uintptr_t addr = reinterpret_cast<uintptr_t>(si->si_addr);
  if (g != nullptr && si->si_code > 0 && Find(addr) >= 0) {
    t_guard = nullptr;
    g->fault = addr;
    siglongjmp(g->jb, 1);
  }
  Chain(sig, si, ctx);
}

void Install() {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = OnSigbus;
  // SA_NODEFER: SIGBUS stays unblocked in the handler, so jumping out of it
  // needs no signal mask restored, and guards use sigsetjmp(jb, 0): no
  // rt_sigprocmask call per guarded region (crc32 runs one per call).
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &g_previous);
}

bool Register(void* p, size_t len, int64_t offset, int fd) {
  for (int i = 0; i < kSlots; i++) {
    uintptr_t expected = 0;
    Slot& s = g_slots[i];
    // Claim the slot with a placeholder so the handler sees an empty range
    // (hi == 0) until offset and fd are set.
    if (!s.lo.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) continue;
    s.hi.store(0, std::memory_order_relaxed);
    s.offset.store(offset, std::memory_order_relaxed);
    s.fd.store(fd, std::memory_order_relaxed);
    s.hi.store(reinterpret_cast<uintptr_t>(p) + len, std::memory_order_relaxed);
    s.lo.store(reinterpret_cast<uintptr_t>(p), std::memory_order_release);
    return true;
  }
  return false;
}

void Unregister(void* p) {
  for (Slot& s : g_slots) {
    if (s.lo.load(std::memory_order_acquire) == reinterpret_cast<uintptr_t>(p)) s.lo.store(0, std::memory_order_release);
  }
}

}  // namespace

void GuardBegin(InputGuard* g) { t_guard = g; }
void GuardEnd() { t_guard = nullptr; }

bool InputAt(uintptr_t addr, int64_t* fileOffset, int* fd) {
  int i = Find(addr);
  if (i < 0) return false;
  *fileOffset = g_slots[i].offset.load() + int64_t(addr - g_slots[i].lo.load());
  *fd = g_slots[i].fd.load();
  return true;
}

std::string TruncatedMessage(uintptr_t addr) {
  int64_t off = 0;
  int fd = -1;
  if (!InputAt(addr, &off, &fd)) return "the input file was truncated while being read";
  struct stat st;
  std::string now = fstat(fd, &st) == 0 ? " (the file now has " + std::to_string(st.st_size) + " bytes)" : "";
  return "the input file was truncated while being read: byte " + std::to_string(off & ~int64_t(4095)) + " is gone" + now;
}

bool GuardedCrc32(uint32_t crc, const uint8_t* p, size_t n, uint32_t* out, uintptr_t* fault) {
  InputGuard g;
  if (sigsetjmp(g.jb, 0) != 0) {
    GuardEnd();
    *fault = g.fault;
    return false;
  }
  GuardBegin(&g);
  *out = Crc32(crc, p, n);
  GuardEnd();
  return true;
}

// mapInput(fd, offset, length, populate = false). MAP_POPULATE sets up the page
// tables in one call instead of a fault per 64 KiB as the reader goes.
Napi::Value MapInput(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t off = info[1].As<Napi::Number>().Int64Value();
  size_t len = size_t(info[2].As<Napi::Number>().Int64Value());
  bool populate = info.Length() >= 4 && info[3].ToBoolean().Value();
  if (len == 0 || off < 0 || off % sysconf(_SC_PAGESIZE) != 0) {
    Napi::RangeError::New(env, "mapInput: length must be > 0 and offset page-aligned").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  std::call_once(g_installed, Install);
  void* p = mmap(nullptr, len, PROT_READ, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, off);
  if (p == MAP_FAILED) {
    ErrnoError(env, errno, "mmap of the input at byte " + std::to_string(off)).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!Register(p, len, off, fd)) {
    munmap(p, len);
    ErrnoError(env, EMFILE, "mapInput: too many input mappings alive").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  madvise(p, len, MADV_SEQUENTIAL);
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t*>(p), len, [](Napi::Env, uint8_t* data, size_t* n) {
    Unregister(data);
    munmap(data, *n);
    delete n;
  }, new size_t(len));
}

}  // namespace bgsnap
