// One capture of one process: freeze, protect, detach, then save every page
// exactly once on a dedicated thread while the target runs.
#pragma once
#include <linux/userfaultfd.h>

#include <pthread.h>

#include <functional>
#include <thread>

#include "capture.h"
#include "freezer_client.h"
#include "procfs.h"

namespace bgsnap {

bool CheckBlockSize(const MapEntry& m, Failure* f);  // preflight.cc
void RealTime(bool on);
std::string BlockName(const MapEntry& m);  // uffd_capture.cc: "START-END PERMS [PATH]" (hex)                              // session.cc: the freezes run SCHED_FIFO

// A mutex with priority inheritance. The real-time fault server and the scan
// share the saver's state under one; with a plain mutex, a scan preempted
// while holding it (by the target's own threads, on busy CPUs) kept the fault
// server, and so the faulting writer, waiting for a whole time slice: Redis saw
// 40-60 ms stalls right after the snapshot. With inheritance the holder runs at
// the waiter's priority until it lets go.
class PiMutex {
 public:
  PiMutex() {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setprotocol(&a, PTHREAD_PRIO_INHERIT);
    pthread_mutex_init(&m_, &a);
    pthread_mutexattr_destroy(&a);
  }
  ~PiMutex() { pthread_mutex_destroy(&m_); }
  PiMutex(const PiMutex&) = delete;
  PiMutex& operator=(const PiMutex&) = delete;
  void lock() { pthread_mutex_lock(&m_); }
  void unlock() { pthread_mutex_unlock(&m_); }

 private:
  pthread_mutex_t m_;
};

struct Gather;  // page_read.cc: a read of scattered runs in one call

class Session {
 public:
  enum State { kFreezing = 0, kRunning = 1, kDone = 2, kFailed = 3 };

  Session(pid_t pid, const Options& o) : pid_(pid), opts_(o) {}
  ~Session();
  // notify() is called from the capture thread whenever JavaScript may have
  // something to look at; it must never block.
  void Start(std::function<void()> notify, std::function<void()> release);
  void Abort();
  void Join();
  bool JoinFor(double ms);  // false: the capture thread is still running

  int state() const { return state_.load(); }
  bool frozen() const { return frozen_.load(); }  // the snapshot point was reached
  Failure failure();
  std::vector<std::pair<int, std::vector<uint32_t>>> TakeDiscards();
  void FaultWaits(double* p50, double* p99, double* max, size_t* n);

  BufferPool pool;
  Counters counters;
  // Filled during the freeze; read-only once state() >= kRunning.
  pid_t pid() const { return pid_; }
  FreezeStats freeze;
  std::vector<ThreadState> threads;
  std::vector<MapEntry> maps;
  std::vector<Block> blocks;  // JS reads only the fixed fields
  std::string auxv, cmdline, exe, status, mapsText, environ;
  double seconds = 0;

  // --- Chains (generations.cc) ---
  // The generation frozen last (1 after startCapture), and the last one whose
  // pages are all published (JavaScript's nextBuffer then returns null).
  int generation() const { return gen_.load(); }
  int generationDone() const { return genDone_.load(); }
  void RequestGeneration();  // JS thread: freeze the next generation now

 private:
  struct Fault {
    uint64_t addr;
    double since;  // the saver's previous look at the queue: an upper bound
  };
  void Run();
  void Watchdog();
  void Finish(const Failure& f);
  double Hold(const char* at, bool ok = true);
  void CloseUffd();
  void UnregisterAll();
  void Stuck();
  // The two stops (session.cc): a short one that plants the userfaultfd, and
  // the snapshot freeze after the memory was write-protected while running.
  bool Setup(Failure* f);
  bool Stops(Failure* f);
  bool SmallFootprint();
  bool OpenPagemap(Failure* f);
  bool ArmFreeze(Failure* f);
  bool SnapshotFreeze(bool arm, Failure* f);
  bool FrozenWork(Failure* f);
  // Freeze phase (uffd_capture.cc).
  bool ProbeKernel(Failure* f);
  bool CheckDumpable(Failure* f);                          // preflight.cc
  bool ReadProcState(Failure* f);
  bool FreezeAndInject(double* seizeMs, Failure* f);
  bool InjectUffd(Failure* f);
  bool InjectSyncUffd(InjectRequest r, Failure* f);
  bool PlantUffd(const InjectRequest& r, int* fd, int* via, bool* suspended, Failure* f);
  bool Skippable(const MapEntry& m, std::string* why) const;
  bool ReadSmaps(bool frozen, Failure* f);
  bool RecheckSmaps(Failure* f);
  bool DontDump(const MapEntry& m) const;
  bool PlanAndRegister(Failure* f);
  bool ScanUntouched(Failure* f);
  bool ShmemHoles(Failure* f);
  bool CopyFrozen(Failure* f);
  bool FrozenReadTimeout(const std::shared_ptr<void>& job, Failure* f);
  // Write-protect ahead of the freeze, and complete it while frozen (protect.cc).
  using Range = std::pair<uint64_t, uint64_t>;
  bool PreProtect(Failure* f);
  std::vector<Range> RegisterAll();
  bool Unprotected(const std::vector<Range>& in, std::vector<Range>* out, uint64_t* pages,
                   Failure* f);
  bool ProtectRanges(const std::vector<Range>& ranges, bool serve, Failure* f);
  bool ProtectPiece(const Range& r, bool strict, Failure* f);
  bool ServePre(Failure* f);
  void PreFault(uint64_t addr);
  bool ProtectUnprotected(Failure* f);
  struct ScanPart;
  std::vector<ScanPart> SplitScan(unsigned n);
  void ScanShare(ScanPart* part);
  // Saver (saver.cc).
  bool SaverLoop(Failure* f);
  bool ReadEvents(Failure* f, const std::function<void(const uffd_msg&)>& on, int fd = -1);
  bool Drain(Failure* f);
  void OnRemove(uint64_t start, uint64_t end, bool unmapped);
  void OnRemap(uint64_t from, uint64_t to, uint64_t len);
  void CutSegments(uint64_t start, uint64_t end, std::vector<Segment>* cut);
  void DiscardPages(int b, uint32_t p0, uint32_t p1);
  const Segment* FindSeg(uint64_t addr) const;
  const Segment* SegForPage(int b, uint32_t p) const;
  bool Thaw(bool ok, Failure* f);
  void NoteThreads();
  bool HandleFaults(Failure* f);
  bool HandleFault(const Fault& ft, Failure* f);
  void WidenSaved(const Segment& s, uint64_t addr, uint32_t* p0, uint32_t* p1) const;
  static void GranulePages(const Segment& s, uint64_t addr, uint64_t g, uint32_t* p0, uint32_t* p1);
  bool ResolveStray(uint64_t addr, Failure* f);
  bool Touched(uint64_t start, uint64_t end, size_t from) const;
  bool ForceRead(uint64_t addr, uint8_t* dst);
  uint32_t StillProtected(int b, uint32_t p, uint64_t addr, uint32_t n);
  bool SavePages(int b, uint32_t p0, uint32_t p1, Failure* f);
  int ReadRun(int b, uint32_t p, uint32_t n, Failure* f);
  // held: a side read (side_read.cc), which leaves done bits and counters alone.
  void Commit(Batch* bt, int b, uint32_t p, uint32_t n, uint32_t summed = 0, const uint8_t* from = nullptr, bool held = false);
  ssize_t ReadSummed(uint64_t addr, uint8_t* dst, uint32_t n, uint32_t* crcs, uint32_t* summed, int* err);
  uint32_t RunEnd(const Block& blk, uint32_t p, uint32_t p1) const;
  Batch* OpenBatch(int b, Failure* f);
  void PublishAll();
  bool Unprotect(int b, uint32_t p0, uint32_t p1, Failure* f);
  bool Release(uint64_t start, uint64_t len, Failure* f);
  void LetGo(bool wait);
  bool GiveUp(uint64_t start, uint64_t len, Failure* f);
  bool Unregister(uint64_t start, uint64_t len, Failure* f);
  static std::string Hex(uint64_t start, uint64_t len);
  int WpIoctl(uint64_t start, uint64_t len, bool protect);  // 0 or errno
  void Wake(uint64_t addr);
  bool ScanChunk(size_t* cb, uint32_t* cp, Failure* f);
  uint32_t NextSegPage(int b, uint32_t p) const;
  bool Pace(Failure* f);
  // The fault server (fault_server.cc): a thread of its own that only serves
  // write faults, woken by the userfaultfd itself, while the scan reads.
  bool WaitScanRoom(Failure* f);
  bool StartFaultServer(Failure* f);
  void StopFaultServer(Failure* f);
  void FaultServer();
  void KickFaultServer();
  Batch* ScanBatch(int b, Failure* f);

  pid_t pid_;
  Options opts_;
  std::function<void()> notify_, release_;
  std::atomic<bool> frozen_{false};
  std::thread thread_, watchdog_;
  std::atomic<int> state_{kFreezing};
  std::atomic<bool> abort_{false};
  std::atomic<int> uffd_{-1};  // closed only by the capture thread, under fdMu_
  std::mutex fdMu_;
  std::atomic<bool> ended_{false};  // Run returned
  std::atomic<double> heartbeat_{0}, waitingSince_{0};
  std::mutex mu_;  // failure_, discards_, waits_
  std::condition_variable doneCv_;
  Failure failure_;
  std::vector<std::pair<int, std::vector<uint32_t>>> discards_;
  std::vector<float> waits_;  // µs, one per fault
  // Saver state, shared by the scan (the capture thread) and the fault server,
  // under saveMu_. The scan lets go of it only while it reads the target.
  PiMutex saveMu_;
  std::thread faultThread_;
  int kickFd_ = -1;                   // eventfd: faults the scan read off the fd
  std::atomic<bool> stopFaults_{false};
  Failure faultFailure_;              // the fault server's own, under mu_
  Batch* scanBatch_ = nullptr;        // the scan's batch: faults never write to it
  std::vector<Segment> segs_;  // sorted by start
  std::vector<Fault> faults_;
  std::vector<Batch*> open_;
  uint64_t epoch_ = 0;  // bumped by every layout event (remove, unmap, remap)
  std::vector<Range> touched_;  // ranges layout events touched, cleared when the scan's read begins
  std::vector<Range> remapTo_;  // mremap destinations seen since Release's unregister
  int memFd_ = -1;              // /proc/PID/mem, opened on the first unreadable page
  double lastLook_ = 0;
  // Which thread runs this code: the fault server or the scan. Per thread, as
  // each may let go of saveMu_ (Release, a read) while the other runs.
  static thread_local bool faultMode_;
  double paceStart_ = 0;
  uint64_t scannedBytes_ = 0;
  FreezerClient helper_{pid_};  // the target's tracer, a process of its own
  std::vector<VmaFlags> smaps_;     // MADV_DONTDUMP by VMA (ReadSmaps)
  int pagemapFd_ = -1;              // the target's /proc/PID/pagemap, for PAGEMAP_SCAN
  std::vector<uint64_t> preFaults_;  // pre-phase faults still to release (EAGAIN)

  // --- Chains (generations.cc) ---
  bool Chain(Failure* f);
  bool WaitForRequest(Failure* f);
  bool ServeBetween(Failure* f);
  void NoteLayout(uint64_t start, uint64_t end);
  bool NextFreeze(Failure* f);
  bool StopForGeneration(Failure* f);
  bool KeepBlock(int bi, size_t mapIndex);
  bool FrozenNext(Failure* f);
  bool Relayout(Failure* f);
  bool PlanBlock(size_t mapIndex, Failure* f);  // uffd_capture.cc
  bool PreDirty(Failure* f);
  bool ForWritten(const std::function<void(uint64_t, uint64_t)>& fn, Failure* f, bool protect = false);
  bool MarkDirty(Failure* f);
  static bool Touches(const Block& b, const std::vector<Range>& ranges);
  void DirtyRanges(Block* b, const std::vector<Range>& ranges, bool sorted = false);
  void DirtyRun(int b, uint64_t s, uint64_t e, uint64_t cats, bool kept, size_t first, std::vector<Range>* todo);
  void KeepUnchangedCopies(std::vector<std::vector<uint8_t>>* prev);
  void RebuildSegments();
  size_t firstNew_ = 0;  // blocks from here on were added by the generation being frozen
  void ChainUnprotect(uint64_t addr);
  void RetryUnprotects();
  // --- Pre-copy (precopy.cc) ---
  void LastPass();
  // The stop being taken saves the snapshot inside it; or, syncFinish_, it is
  // the snapshot and the rest is saved with write-protect faults (SwitchToSync).
  bool PrecopySnapshot() const { return opts_.precopy && !freeze.pass && !syncFinish_; }
  bool AsyncWp() const { return opts_.precopy && !syncFinish_; }  // writers never wait on us
  bool SwitchToSync(std::vector<Range>* todo, Failure* f);
  bool MoveToSync(Block* b, Failure* f);
  bool StagedMove(Failure* f);
  struct MovingPiece {
    Block* block;
    uint64_t start, end;
  };
  bool MoveStop(std::vector<MovingPiece>* pieces, Failure* f);
  bool MovePiece(uint64_t start, uint64_t end);
  bool FinishDirty(std::vector<Range>* todo, Failure* f);
  // --- Side reads (side_read.cc) ---
  bool SideRead(size_t from, Failure* f);
  std::vector<int> SideReadBlocks(const std::vector<Range>& runs) const;
  const Block* BlockAt(uint64_t s, uint64_t e) const;
  Batch* HeldBatch(int b, uint32_t need);
  bool ReadHeld(int b, const std::vector<Range>& part, uint32_t pages, std::vector<Range>* left);
  void PublishHeld(bool keep);
  std::vector<Batch*> held_;  // read during the move, out when the snapshot's generation begins
  bool SaveWrittenInStop(Failure* f);
  std::vector<Range> stopSave_;  // the finish: written since memory moved, saved in the snapshot's stop
  bool stopSaved_ = false;       // the finish's generation began in its stop (SaveWrittenInStop)
  bool stopSaving_ = false;      // the saver runs inside that stop
  bool ServeFor(double ms, Failure* f);
  bool syncFinish_ = false;
  int syncUffd_ = -1;  // pre-copy: a second userfaultfd, synchronous, for its finish
  // Pre-copy's finish: the asynchronous userfaultfd once the synchronous one
  // became uffd_ (StagedMove), until nothing is registered on it (SwitchToSync).
  // Closed only by the capture thread, under fdMu_, as uffd_.
  std::atomic<int> asyncUffd_{-1};
  uint64_t LayoutPresent(Failure* scan);
  bool SaveInFreeze(Failure* f, bool whole = true);
  uint64_t StopSaveLimit() const;
  bool SavingInStop() const { return savedInFreeze_ || stopSaving_; }  // no writer can fault meanwhile
  bool WaitOutput(Failure* f);
  int ScanAhead();
  void PassNice(bool on);  // precopy.cc
  int passNiceWas_ = 100;  // the saver's nice before its passes (100: not changed)
  int ReadGathered(int b, uint32_t p, uint32_t p1, Failure* f);
  bool PlanGather(int b, uint32_t p, uint32_t p1, const Batch* bt, Gather* g) const;
  int CommitGathered(Batch* bt, int b, const Gather& g, bool stopped);
  bool savedInFreeze_ = false;  // the snapshot generation is saved: the chain ends
  std::atomic<int> gen_{0}, genDone_{0};
  std::atomic<bool> genWanted_{false};
  int genFd_ = -1;                 // eventfd: JavaScript wants the next generation
  std::vector<Range> layoutSince_;  // removed, unmapped or remapped since the last freeze
  std::vector<Range> preDirty_;     // written since the last instant, protected again before this freeze
};

}  // namespace bgsnap
