// Lifecycle of a capture: the capture thread (freeze, then saver), the watchdog,
// and the teardown that always drops the protection.
#include "session.h"

#include "procfs.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstdio>
#include <cstring>

namespace bgsnap {

Session::~Session() {
  Abort();
  if (JoinFor(5000)) return;
  // Only at process exit (closeCapture keeps a stuck session alive instead):
  // let the threads go rather than abort the exit.
  if (watchdog_.joinable()) watchdog_.detach();
  thread_.detach();
}

void Session::Start(std::function<void()> notify, std::function<void()> release) {
  notify_ = std::move(notify);
  release_ = std::move(release);
  thread_ = std::thread(&Session::Run, this);
}

void Session::Abort() {
  abort_ = true;
  pool.Wake();
}

void Session::Join() {
  if (thread_.joinable()) thread_.join();
}

// Abort and wait at most `ms` for the capture thread to end. Abort is repeated:
// a wake-up that raced the saver going to sleep (it waits for JavaScript to
// give a buffer back) is then not lost for good.
bool Session::JoinFor(double ms) {
  if (!thread_.joinable()) return true;
  for (double until = NowMs() + ms; !ended_ && NowMs() < until;) {
    Abort();
    usleep(5000);
  }
  if (!ended_) return false;
  thread_.join();
  return true;
}

Failure Session::failure() {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

std::vector<std::pair<int, std::vector<uint32_t>>> Session::TakeDiscards() {
  std::lock_guard<std::mutex> lock(mu_);
  return std::move(discards_);
}

void Session::FaultWaits(double* p50, double* p99, double* max, size_t* n) {
  std::vector<float> w;
  {
    std::lock_guard<std::mutex> lock(mu_);
    w = waits_;
  }
  *n = w.size();
  *p50 = *p99 = *max = 0;
  if (w.empty()) return;
  std::sort(w.begin(), w.end());
  *p50 = w[w.size() / 2] / 1000.0;
  *p99 = w[std::min(w.size() - 1, w.size() * 99 / 100)] / 1000.0;
  *max = w.back() / 1000.0;
}

// Tests kill us at these points to prove the target survives our death.
// Returns the milliseconds held, which are not part of the pause.
double Session::Hold(const char* at, bool ok) {
  if (!ok || opts_.holdAt != at || opts_.holdMs == 0) return 0;
  dprintf(2, "bgsnap-hold %s\n", at);
  double t0 = NowMs(), until = t0 + opts_.holdMs;
  while (NowMs() < until && !abort_) usleep(1000);
  return NowMs() - t0;
}

// Tests: a saver stuck where abort cannot reach it (inside a kernel call), for
// holdMs, to show the watchdog releases the target without closing its fd.
void Session::Stuck() {
  if (opts_.holdAt != "stuck" || opts_.holdMs == 0) return;
  dprintf(2, "bgsnap-hold stuck\n");
  for (double until = NowMs() + opts_.holdMs; NowMs() < until;) usleep(1000);  // signals end a usleep early
}

// Only the capture thread closes the userfaultfd, under fdMu_: the watchdog
// uses the number only under fdMu_, so it can never reach a number the process
// reused for something else after the close.
void Session::CloseUffd() {
  std::lock_guard<std::mutex> lock(fdMu_);
  int fd = uffd_.exchange(-1);
  if (fd >= 0) close(fd);  // unregisters everything and wakes every waiting writer
  if (syncUffd_ >= 0) close(syncUffd_);
  syncUffd_ = -1;
  fd = asyncUffd_.exchange(-1);
  if (fd >= 0) close(fd);
}

// The watchdog's way to drop the protection while the capture thread may still
// be inside a call on the fd: unregister every mapping of the target (each
// unregister clears its write-protection and wakes its writers). Mappings that
// are not ours fail with EINVAL, which is fine.
void Session::UnregisterAll() {
  std::lock_guard<std::mutex> lock(fdMu_);
  std::string text;
  std::vector<MapEntry> now;
  if (uffd_.load() < 0 || !ReadWhole("/proc/" + std::to_string(pid_) + "/maps", &text) || !ParseMaps(text, &now)) return;
  // Unregistering wakes only MISSING-mode waiters (fs/userfaultfd.c): writers
  // already waiting on a write-protect fault are woken explicitly. During
  // pre-copy's finish part of the memory is still on the asynchronous one.
  for (int fd : {uffd_.load(), asyncUffd_.load()}) {
    if (fd < 0) continue;
    for (const MapEntry& m : now) {
      uffdio_range r{m.start, m.end - m.start};
      ioctl(fd, UFFDIO_UNREGISTER, &r);
      ioctl(fd, UFFDIO_WAKE, &r);
    }
  }
}

// The freeze competes for 2 cores with the target's busy threads: losing the CPU
// mid-freeze stretched the pause from 0.3 ms to 230 ms. Run it real-time (it
// lasts milliseconds and sleeps while waiting; needs root, best effort). The
// scan that follows runs at the target's own level: writers wait on the fault
// server, not on it, and a scan favoured over the target slows the target.
void RealTime(bool on) {
  sched_param sp{on ? sched_get_priority_min(SCHED_FIFO) : 0};
  pthread_setschedparam(pthread_self(), on ? SCHED_FIFO : SCHED_OTHER, &sp);
}

bool Session::Setup(Failure* f) {
  if (pid_ <= 0 || pid_ == getpid()) return f->Set(EINVAL, "cannot capture PID " + std::to_string(pid_));
  if (!CheckDumpable(f) || !ProbeKernel(f)) return false;
  if (!pool.Init(opts_.bufferMb, f)) return false;  // pre-faulted before the pause
  if (opts_.precopy) pool.NoReserve();
  Failure later;  // a process that is gone or a kernel thread: the freeze says so
  ReadSmaps(false, &later);                         // outside the pause
  if (!helper_.Start(f)) return false;
  bool ok = Stops(f);
  helper_.Stop();  // no more stops: it exits, having detached everything
  return ok;
}

bool Session::Stops(Failure* f) {
  if (!opts_.preProtect || SmallFootprint()) {
    freeze.stops = 1;
    if (!SnapshotFreeze(true, f)) return false;
    watchdog_ = std::thread(&Session::Watchdog, this);
    return true;
  }
  if (!ArmFreeze(f)) return false;
  watchdog_ = std::thread(&Session::Watchdog, this);  // from now on writers may wait on us
  bool ok = PreProtect(f) && SnapshotFreeze(false, f);
  if (!ok) CloseUffd();
  return ok;
}

// Protecting 4 KiB pages inside the freeze costs ~15 ms per GiB; a second stop
// costs about 1 ms whatever the size. So one stop when the memory mapped by
// 4 KiB pages is small (a small process, or one living in huge pages: a huge
// page is protected with one entry), two otherwise. Measured before freezing.
bool Session::SmallFootprint() {
  std::string text;
  if (!ReadWhole("/proc/" + std::to_string(pid_) + "/smaps_rollup", &text)) return false;
  auto kb = [&text](const char* key) {
    size_t at = text.find(key);
    return at == std::string::npos ? 0ull : strtoull(text.c_str() + at + strlen(key), nullptr, 10);
  };
  uint64_t huge = kb("\nAnonHugePages:") + kb("\nShmemPmdMapped:") + kb("\nFilePmdMapped:");
  return kb("\nRss:") < huge + (32u << 10);  // kB
}

bool Session::OpenPagemap(Failure* f) {
  std::string path = "/proc/" + std::to_string(pid_) + "/pagemap";
  pagemapFd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  return pagemapFd_ >= 0 || f->Set(errno, "opening " + path);
}

// Freeze with a thread fit for injection, and plant the userfaultfd. A signal
// that arrives while we inject stays held in its delivery stop (EAGAIN): let
// every thread take its signals, and start again.
bool Session::FreezeAndInject(double* seizeMs, Failure* f) {
  for (int tries = 1;; tries++) {
    double t0 = NowMs();
    bool ok = helper_.Freeze(0, true, f);
    double t1 = NowMs();
    *seizeMs = t1 - t0;
    maps.clear();
    ok = ok && ReadProcState(f) && InjectUffd(f);
    freeze.injectMs = NowMs() - t1;
    if (ok || f->err != EAGAIN || tries == 5 || helper_.lost()) return ok;
    Failure ignored;
    helper_.Detach(&ignored);
    *f = Failure();
  }
}

// First of two stops: plant the userfaultfd. It lasts about a millisecond
// whatever the target's size; the write-protection follows while it runs.
bool Session::ArmFreeze(Failure* f) {
  RealTime(true);
  double t0 = NowMs(), seize = 0;
  bool ok = FreezeAndInject(&seize, f) && OpenPagemap(f);
  double held = Hold("inject", ok);
  if (!ok) CloseUffd();
  Failure detach;
  if (!helper_.Detach(&detach) && ok) *f = detach, ok = false;
  freeze.armMs = NowMs() - t0 - held;
  RealTime(false);
  return ok;
}

// The stopped threads and their registers, as the state of this stop.
void Session::NoteThreads() {
  threads = helper_.threads();
  freeze.threads = static_cast<int>(threads.size());
}

// The end of every stop, a first capture's or a chain generation's: note the
// threads, drop every protection if the stop failed (before the threads run
// again), let them go, and leave real-time. A failed detach fails the stop.
bool Session::Thaw(bool ok, Failure* f) {
  NoteThreads();
  if (!ok) CloseUffd();
  double t0 = NowMs();
  Failure detach;
  if (!helper_.Detach(&detach) && ok) *f = detach, ok = false;
  freeze.detachMs = NowMs() - t0;
  RealTime(false);
  return ok;
}

// The snapshot point: every thread stopped (after planting the userfaultfd
// when `arm`: the one-stop way), then every page is made either protected,
// known never touched (zero), or copied now. After PreProtect only what the
// target wrote or mapped since is left to protect.
bool Session::SnapshotFreeze(bool arm, Failure* f) {
  RealTime(true);
  double t0 = NowMs(), held = 0, seize = 0;
  std::function<void()> serve = [this] { Failure ignored; ServePre(&ignored); };
  bool ok = arm ? FreezeAndInject(&seize, f) && OpenPagemap(f)
                : helper_.Freeze(0, false, f, serve, uffd_.load());
  double t1 = NowMs();
  timeval tv;
  gettimeofday(&tv, nullptr);
  freeze.snapshotTime = tv.tv_sec * 1e3 + tv.tv_usec / 1e3;
  freeze.seizeMs = arm ? seize : t1 - t0;
  freeze.rounds = helper_.rounds();
  if (arm) {
    held = Hold("inject", ok);
  } else {
    // Release pre-phase faults read before every thread stopped; any left now
    // are dropped: their threads fault again after the freeze, served then.
    ok = ok && ServePre(f);
    preFaults_.clear();
    maps.clear();
    ok = ok && ReadProcState(f);
  }
  ok = ok && RecheckSmaps(f) && FrozenWork(f) && (!arm || helper_.ReadThreads(f));
  held += Hold("frozen", ok);
  ok = Thaw(ok, f);
  freeze.snapshotMs = NowMs() - t0 - held;
  freeze.totalMs = freeze.armMs + freeze.snapshotMs;
  return ok;
}

bool Session::FrozenWork(Failure* f) {
  double t0 = NowMs();
  bool ok = PlanAndRegister(f);
  double t1 = NowMs();
  ok = ok && ProtectUnprotected(f) && ScanUntouched(f) && ShmemHoles(f);
  double t2 = NowMs();
  ok = ok && CopyFrozen(f);
  freeze.registerMs = t1 - t0;
  freeze.protectMs = t2 - t1 - freeze.pagemapMs;
  freeze.copyMs = NowMs() - t2;
  return ok;
}

void Session::Run() {
  Failure f;
  double t0 = NowMs();
  heartbeat_ = t0;
  if (Setup(&f)) {
    heartbeat_ = NowMs();
    for (size_t i = 0; i < blocks.size(); i++) {
      const Block& b = blocks[i];
      if (b.kind == BlockKind::kProtected) {
        segs_.push_back({b.start, b.start + b.length, static_cast<int>(i), 0});
      }
    }
    std::sort(segs_.begin(), segs_.end(),
              [](const Segment& a, const Segment& b) { return a.start < b.start; });
    gen_ = 1;
    freeze.pass = opts_.precopy;  // a pre-copy's first generation is always a pass
    frozen_ = true;
    state_ = kRunning;
    notify_();
    if (opts_.precopy) PassNice(true);
    if (SaverLoop(&f) && opts_.chain) Chain(&f);  // chains: generations.cc
  }
  seconds = (NowMs() - t0) / 1000;
  Finish(f);
  if (watchdog_.joinable()) watchdog_.join();
  release_();  // after the last notify: JavaScript may let the loop exit
  ended_ = true;
}

void Session::Finish(const Failure& f) {
  if (!f.failed()) PublishAll();
  CloseUffd();
  if (pagemapFd_ >= 0) close(pagemapFd_);
  if (memFd_ >= 0) close(memFd_);
  pagemapFd_ = memFd_ = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failure_.failed()) failure_ = f;  // the watchdog's reason wins
    state_ = failure_.failed() ? kFailed : kDone;
  }
  doneCv_.notify_all();
  notify_();
}

// The target's writers wait on the saver without a timeout. If it stops making
// progress (a bug, or JavaScript not draining buffers), drop the protection.
void Session::Watchdog() {
  std::unique_lock<std::mutex> lock(mu_);
  while (state_ < kDone) {
    doneCv_.wait_for(lock, std::chrono::milliseconds(100));
    if (state_ >= kDone) break;
    double idle = NowMs() - heartbeat_;
    if (idle < opts_.stallMs) continue;
    failure_.Set(ETIMEDOUT, "capture stalled for " + std::to_string(int(idle)) +
                                " ms; protection dropped so the target can run");
    abort_ = true;
    pool.Wake();
    // Give the saver a moment to tear down itself, then release the target
    // under it (it may be stuck in a call on the fd: the fd stays its own).
    doneCv_.wait_for(lock, std::chrono::milliseconds(1000));
    if (state_ < kDone) UnregisterAll();
    while (state_ < kDone) doneCv_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

}  // namespace bgsnap
