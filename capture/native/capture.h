// Types shared by the process capture engine: the frozen threads, the target's
// mappings, the blocks we save, and the bounded buffers JavaScript drains.
//
// Threading: one dedicated std::thread per capture does everything that touches
// the target (ptrace requests must come from the thread that attached, and the
// target's writers wait on this thread while protection is active). The JS thread
// only takes ready buffers, gives them back, and reads counters.
#pragma once
#include <sys/types.h>
#include <sys/user.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace bgsnap {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kHuge = 2ull << 20;
constexpr uint64_t kMaxBlockPages = 1ull << 31;  // preflight.cc: CheckBlockSize

// A failure: errno-style code plus a sentence for people.
struct Failure {
  int err = 0;
  std::string what;
  bool Set(int e, const std::string& w) {
    if (err == 0) { err = e; what = w; }
    return false;  // so callers can `return f.Set(...)`
  }
  bool failed() const { return err != 0; }
};

double NowMs();  // CLOCK_MONOTONIC milliseconds

struct ThreadState {
  pid_t tid = 0;
  bool attached = false;
  bool stopped = false;
  bool exited = false;
  bool eventStop = false;     // PTRACE_EVENT_STOP: a clean place to inject
  bool syscallStop = false;   // in the exit stop of an injected syscall (helper only)
  int pendingSignal = 0;      // signal-delivery-stop held; re-delivered at detach
  user_regs_struct regs{};
  user_fpregs_struct fpregs{};
  // PTRACE_GETREGSET(NT_X86_XSTATE): the XSAVE area (AVX, AVX-512, PKRU) in the
  // layout core files carry; empty when the CPU or kernel offers none.
  std::vector<uint8_t> xstate;
};

struct MapEntry {
  uint64_t start = 0, end = 0, offset = 0, inode = 0;
  std::string perms, dev, path;
  int block = -1;   // index into the capture's blocks, -1 when not captured
  std::string how;  // "protected", "copied", or "skipped: <why>"
};

// One bit per page of a block.
class Bitmap {
 public:
  void Resize(uint32_t bits) { words_.assign((bits + 63) / 64, 0); }
  bool Empty() const { return words_.empty(); }
  bool Test(uint32_t i) const { return (words_[i >> 6] >> (i & 63)) & 1; }
  void Set(uint32_t i) { words_[i >> 6] |= 1ull << (i & 63); }
  void Clear(uint32_t i) { words_[i >> 6] &= ~(1ull << (i & 63)); }
  void SetRange(uint32_t a, uint32_t b) { Fill(a, b, true); }
  void ClearRange(uint32_t a, uint32_t b) { Fill(a, b, false); }
  // First index in [a, b) whose bit is clear (NextClear) or set (NextSet), or b.
  uint32_t NextClear(uint32_t a, uint32_t b) const { return Next(a, b, ~0ull); }
  uint32_t NextSet(uint32_t a, uint32_t b) const { return Next(a, b, 0); }

 private:
  uint32_t Next(uint32_t a, uint32_t b, uint64_t flip) const {
    while (a < b) {
      uint64_t w = (words_[a >> 6] ^ flip) >> (a & 63);
      if (w) { uint32_t r = a + __builtin_ctzll(w); return r < b ? r : b; }
      a = (a | 63) + 1;
    }
    return b;
  }
  void Fill(uint32_t a, uint32_t b, bool on) {
    for (; a < b && (a & 63); a++) on ? Set(a) : Clear(a);
    for (; a + 64 <= b; a += 64) words_[a >> 6] = on ? ~0ull : 0;
    for (; a < b; a++) on ? Set(a) : Clear(a);
  }
  std::vector<uint64_t> words_;
};

enum class BlockKind { kProtected, kCopied };

struct Block {
  uint64_t start = 0, length = 0;  // virtual range at the snapshot point
  uint32_t pages = 0;
  int map = -1;
  BlockKind kind = BlockKind::kProtected;
  bool anonPrivate = false;  // untouched pages read as zero and are not trapped
  bool thp = false;          // save 2 MiB per fault so huge pages are not split
  Bitmap done;               // saved, recorded as zero, or discarded
  Bitmap zeroPending;        // untouched at the snapshot: emit as zero, never read
  std::vector<uint8_t> copy; // kCopied: the bytes taken while frozen
  std::string name;
  // Chains (generations.cc): a block gone from the layout (unmapped, moved,
  // resized, re-protected) keeps its number, which the chain never reuses.
  bool dead = false;
  // Pre-copy's finish: still registered on the asynchronous userfaultfd (not
  // moved to the synchronous one before the snapshot's stop: StagedMove).
  bool onAsync = false;
};

// Where a run of a protected block's pages lives now (mremap moves it).
struct Segment {
  uint64_t start, end;
  int block;
  uint32_t firstPage;
};

struct Options {
  uint32_t bufferMb = 64;
  double rateLimitMBps = 0;   // 0: unpaced
  uint32_t stallMs = 30000;   // watchdog: drop protection if the saver stalls
  uint32_t frozenReadMs = 1000;  // bound on the reads made while the target is frozen
  bool preProtect = true;      // false: protect everything inside the freeze (benchmarks' "before")
  bool includeDontDump = false;  // keep MADV_DONTDUMP ranges, which the kernel's cores leave out
  std::string holdAt;         // tests: "inject", "injecting", "sysctl", "preprotect", "frozen" or "copy"
  uint32_t holdMs = 0;
  bool allowNonDumpable = false;  // capture a prctl(PR_SET_DUMPABLE, 0) target anyway
  bool suspendSeccomp = true;     // tests: false takes the refusal a non-root tracer gets
  uint32_t stepTimeoutMs = 2000;  // an injected syscall taking longer is interrupted and undone
  bool testStuckInjection = false;  // tests: inject a pause() first, which never returns
  // Chains (generations.cc): keep the userfaultfd armed after the save, saved
  // pages stay write-protected, and each later generation saves what was written.
  bool chain = false;
  uint32_t preDirtyMinPages = 4096;  // chains: a dirty set this big is re-protected before the freeze
  // Pre-copy (generations.cc): a chain on a WP_ASYNC userfaultfd whose
  // generations are passes until the pages written since the last one fit in
  // finalPages (or maxPasses were made); the last saves them inside its freeze.
  bool precopy = false;
  // ~3 us a page saved in a stop: Redis's 3.3-7.1k pages took 10.7-19.4 ms,
  // within a fork of its 460 MiB (BGSAVE: 17-44 ms). A target that gets there
  // skips the finish with faults, which made 338-657 of Redis's clients'
  // requests take over 1 ms (bench/RESULTS.md, 2026-12-01).
  uint32_t precopyFinalPages = 4096;
  // Redis's passes still shrank at the 6th (to 4-6k pages): with 4096 pages,
  // 8 rounds of 14 got the snapshot after at most 6 passes, 28 of 35 after 8.
  uint32_t precopyMaxPasses = 8;
  uint32_t precopyMoveMb = 64;      // the finish moves anonymous memory to the synchronous userfaultfd this much per stop
  uint32_t maxUnregisters = 4096;   // fallback unregisters of saved ranges (Release); tests set fewer
  uint32_t retryOnlyMs = 5000;      // past them, how long Release retries one range before failing
};

// The target stops twice: armMs to plant the userfaultfd, snapshotMs for the
// snapshot itself (or once, with armMs 0, when that is cheaper); totalMs is their sum. In between (preProtectMs) it runs while
// we write-protect its memory, and the snapshot freeze re-protects only what it
// wrote meanwhile (reprotectPages in reprotectRanges ioctls).
struct FreezeStats {
  double totalMs = 0, armMs = 0, snapshotMs = 0, preProtectMs = 0;
  double seizeMs = 0, injectMs = 0, registerMs = 0, protectMs = 0;
  double pagemapMs = 0, copyMs = 0, detachMs = 0;
  uint64_t preFaults = 0, preRounds = 0, reprotectRanges = 0, reprotectPages = 0;
  int stops = 2;  // 1 when little memory is mapped by 4 KiB pages (Session::SmallFootprint)
  int threads = 0, rounds = 0;
  bool seccompSuspended = false;  // the injectee's seccomp filter was suspended for our syscalls
  bool sysctlToggled = false;  // vm.unprivileged_userfaultfd set to 1 around injection
  double smapsMs = 0;          // reading /proc/PID/smaps (MADV_DONTDUMP) before the freeze
  double smapsFrozenMs = 0;    // re-reading it inside the freeze: the layout had changed
  bool smapsReread = false;
  int uffdVia = 0;             // kViaSyscall, kViaDev or kViaSysctl (freezer_proto.h)
  double snapshotTime = 0;     // wall-clock ms at the snapshot point
  uint64_t faultsBefore = 0;   // chains: write faults served before this generation's instant
  bool pass = false;           // pre-copy: this generation is a pass, not the snapshot
  uint64_t dirtyBefore = 0;    // pre-copy: pages written since the last pass, counted before this stop
  bool syncFinish = false;     // pre-copy: the snapshot's rest is saved with write-protect faults
  int moveStops = 0;           // pre-copy's finish: the stops that moved memory to the synchronous userfaultfd
  double moveMaxMs = 0, moveMs = 0;  // the longest of them; all of them, with the target's runs between
  uint64_t stopPages = 0;      // pre-copy's finish: written pages its snapshot's stop saved itself
  uint64_t heldPages = 0;      // pre-copy's finish: written pages read during the move (side_read.cc)
};

struct Counters {
  std::atomic<uint64_t> scanPages{0}, faultPages{0}, copiedPages{0};
  std::atomic<uint64_t> zeroPages{0}, untouchedPages{0}, discarded{0};
  std::atomic<uint64_t> bytes{0}, faults{0}, spurious{0}, eagain{0};
  std::atomic<uint64_t> removeEvents{0}, unmapEvents{0}, remapEvents{0};
  std::atomic<uint64_t> batches{0}, bufferWaits{0}, rollbacks{0};
  std::atomic<uint64_t> unregistered{0};
  // Microseconds the linear scan waited for the output to hand buffers back:
  // tells a capture limited by its writer from one limited by the saver.
  std::atomic<uint64_t> scanWaitUs{0};
  // The saver thread's CPU time and wall time from its start to its end: a
  // saver busy nearly all of its time is the limit; one that is not waited
  // (for the output, for saveMu_, or for a core on a busy machine).
  std::atomic<uint64_t> saverCpuUs{0}, saverWallUs{0};
  std::atomic<uint64_t> lostProtection{0};  // pages KSM un-protected and the target then wrote: discarded  // saved ranges released by UFFDIO_UNREGISTER (EAGAIN storms)
};

// A bounded set of pre-faulted page batches. The saver fills one batch per block
// and publishes it; JavaScript takes it, writes it out, and releases it. When all
// are taken, Acquire blocks the saver and so the target's faulting writers: that
// is the throttle, and it bounds our memory whatever the target's size.
struct Batch {
  uint32_t id = 0;
  uint8_t* data = nullptr;
  uint32_t* index = nullptr;
  uint8_t* zero = nullptr;
  // CRC-32 (zlib's) of each data page, in data order: taken by the saver right
  // after its read, while the page is still in its cache, so the stream
  // encoder does not read every page again, cold, on the JavaScript thread.
  uint32_t* crcs = nullptr;
  uint32_t capData = 0, capIndex = 0;
  int block = -1;
  uint32_t count = 0, dataPages = 0;
  enum Owner { kFree, kSaver, kReady, kJs } owner = kFree;
};

struct Memory {
  void* base = nullptr;
  size_t length = 0;
  ~Memory();
};

class BufferPool {
 public:
  ~BufferPool();
  bool Init(uint32_t totalMb, Failure* f);
  // Room for the linear scan: it may not take the batches reserved for faulted
  // pages (half the pool), so a faulting writer waits only for its own copy,
  // never for the disk to take what the scan read. Saver side.
  bool ScanRoom();
  // Faults have eaten half their reserve (the disk lags): each then saves only
  // its own page, not its 64 KiB neighbourhood, so the rest lasts 16x more.
  bool Pressed();
  // Readable after a Release or Wake: the saver polls it with the userfaultfd
  // while it waits for ScanRoom, serving faults meanwhile. Clear before checking.
  int ReleasedFd() const { return efd_; }
  void ClearReleased();
  // Saver side. Acquire returns nullptr when abort was raised while waiting.
  Batch* Acquire(const std::atomic<bool>& abort, std::atomic<double>& waitingSince);
  void Publish(Batch* b);
  size_t FreeCount();
  // Pre-copy: no fault ever waits on us, so the scan may use every batch;
  // its finish with write-protect faults (precopy.cc) takes the reserve back.
  void NoReserve() { kept_ = reserve_, reserve_ = 0; }
  void KeepReserve() { reserve_ = kept_; }
  // Wakes a saver waiting in Acquire after `abort` was raised. It takes the
  // lock: a notify sent between Acquire's check of `abort` and its wait would
  // otherwise be lost, and the saver (so the final join) would sleep forever.
  void Wake();
  // JS side.
  Batch* TakeReady();
  bool Release(uint32_t id);
  size_t ReadyCount();
  std::shared_ptr<Memory> memory;
  std::vector<Batch> batches;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<uint32_t> free_, ready_;
  size_t reserve_ = 0, kept_ = 0, scanNeed_ = 1;
  int efd_ = -1;
  void Signal();
};

}  // namespace bgsnap
