// The fault server, and the scan's buffers.
//
// A writer that faults on a protected page waits until that page is saved.
// Served between the scan's 2 MiB chunks by one saver thread, Redis's clients
// saw p99 3.9 ms during a capture against 0.5 ms during a fork-based BGSAVE:
// the writer waited for the chunk in progress, and on 2 busy cores for the
// saver to be scheduled at all. Now a thread of its own sleeps on the
// userfaultfd, so the kernel wakes it as the writer goes to sleep (often onto
// the very CPU the writer left), and the scan reads without the saver's lock.
//
// The scan also leaves most of the buffer pool to faults: before, a writer
// faulting while the pool was full of scanned pages waited for the disk
// (207-369 ms stalls where BGSAVE gave 21-30 ms).
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>

#include "session.h"

namespace bgsnap {

namespace {
thread_local bool tFaultServer = false;

// Real-time when allowed (root): it only ever runs to serve a waiting writer,
// and must not queue behind the scan, the receiver and the target's other
// threads on crowded CPUs. Else nice -10 (also root-only), else as is.
void ServeUrgently() {
  sched_param rt{sched_get_priority_min(SCHED_FIFO)};
  if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &rt) == 0) return;
  setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), -10);
}
}  // namespace

bool Session::StartFaultServer(Failure* f) {
  kickFd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (kickFd_ < 0) return f->Set(errno, "eventfd for the fault server");
  stopFaults_ = false;  // chains: one server per generation's saver loop
  faultThread_ = std::thread(&Session::FaultServer, this);
  return true;
}

// Its failure wins over the scan's ECANCELED: that was the abort it raised.
void Session::StopFaultServer(Failure* f) {
  stopFaults_ = true;
  KickFaultServer();
  if (faultThread_.joinable()) faultThread_.join();
  close(kickFd_);
  kickFd_ = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (faultFailure_.failed() && (!f->failed() || f->err == ECANCELED)) *f = faultFailure_;
  }
  // Faults the scan's last reads queued after the server's last turn: a chain
  // goes on serving the fd without it (generations.cc), so serve them here.
  std::lock_guard<PiMutex> lock(saveMu_);
  if (!f->failed() && !faults_.empty()) HandleFaults(f);
}

// Faults the scan read off the fd (its Drain after each read) are queued for
// the server, which would otherwise sleep on a fd with nothing left to read.
void Session::KickFaultServer() {
  uint64_t one = 1;
  if (!tFaultServer && kickFd_ >= 0 && write(kickFd_, &one, sizeof one) < 0) {}  // EAGAIN: kicked already
}

void Session::FaultServer() {
  tFaultServer = true;
  ServeUrgently();
  Failure f;
  int wait = 100;
  while (!stopFaults_ && !abort_ && !f.failed()) {
    pollfd p[2] = {{uffd_.load(), POLLIN, 0}, {kickFd_, POLLIN, 0}};
    if (poll(p, 2, wait) < 0 && errno != EINTR) { f.Set(errno, "poll (fault server)"); break; }
    uint64_t n;
    if ((p[1].revents & POLLIN) && read(kickFd_, &n, sizeof n) < 0) {}  // EAGAIN: raced another read
    std::lock_guard<PiMutex> lock(saveMu_);
    if (p[0].revents & POLLIN) lastLook_ = NowMs();  // a fault's wait counts from its wake-up
    if (!Drain(&f) || !HandleFaults(&f)) break;
    // Chains: a writer whose page's un-protect met EAGAIN still waits; retry soon.
    if (!preFaults_.empty()) RetryUnprotects();
    wait = preFaults_.empty() ? 100 : 1;
  }
  if (!f.failed() || abort_.exchange(true)) return;  // an abort's ECANCELED is not news
  std::lock_guard<std::mutex> lock(mu_);
  faultFailure_ = f;
  pool.Wake();
}

// The scan's own batch: faults fill others (OpenBatch), so the scan can read
// into it without the lock. Waiting for a free one lets go of the lock too.
Batch* Session::ScanBatch(int b, Failure* f) {
  Batch* bt = scanBatch_;
  if (bt && bt->block == b && bt->count < bt->capIndex && bt->dataPages < bt->capData) return bt;
  if (bt) {
    pool.Publish(bt);
    counters.batches++;
    notify_();
  }
  scanBatch_ = nullptr;
  if (pool.FreeCount() == 0) counters.bufferWaits++;
  saveMu_.unlock();
  bt = pool.Acquire(abort_, waitingSince_);
  saveMu_.lock();
  if (!bt) return f->Set(ECANCELED, "capture aborted"), nullptr;
  bt->block = b;
  scanBatch_ = bt;
  return bt;
}

// No heartbeat here: if JavaScript never releases a batch, the watchdog must
// still see a stalled capture (faults are served until the reserve runs out).
bool Session::WaitScanRoom(Failure* f) {
  while (!pool.ScanRoom()) {
    if (abort_) return f->Set(ECANCELED, "capture aborted");
    // Open batches go out only when JavaScript has nothing else to write: then
    // it frees them at once (a pool of 2 batches needs that to make progress),
    // while publishing a batch per fault when it lags would spend a whole
    // batch on a few pages and use up the reserve (Redis: 941 faults, 64 MiB).
    if (pool.ReadyCount() == 0) {
      std::lock_guard<PiMutex> lock(saveMu_);
      if (!open_.empty() || scanBatch_) PublishAll();
    }
    pollfd p{pool.ReleasedFd(), POLLIN, 0};
    if (poll(&p, 1, 100) < 0 && errno != EINTR) return f->Set(errno, "poll (capture waiting for buffers)");
    if (p.revents & POLLIN) pool.ClearReleased();  // before ScanRoom looks again
  }
  return true;
}

}  // namespace bgsnap
