// The scan waits for buffer room without making faulting writers wait with it.
// Before, the saver blocked in Acquire when the batches were full of scanned
// pages the disk had not taken yet, and a writer faulting meanwhile waited for
// the disk: Redis's clients saw 207-369 ms stalls where a fork-based BGSAVE
// gave 21-30 ms. Now the scan leaves most of the pool to faults and, while it
// waits, the saver keeps serving the userfaultfd.
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>

#include "session.h"

namespace bgsnap {

// While the scan waits, the saver only serves faults and otherwise sleeps in
// poll, so it runs real-time then: a fault wakes it at once even on crowded
// CPUs (at nice -10 a fault still waited 20-24 ms p99 at load 15 on 2 cores).
// Best effort, as for the freeze (needs root); back to nice -10 when it ends.
namespace {
struct RealTimeWhileWaiting {
  bool on;
  RealTimeWhileWaiting() {
    sched_param rt{sched_get_priority_min(SCHED_FIFO)};
    on = pthread_setschedparam(pthread_self(), SCHED_FIFO, &rt) == 0;
  }
  ~RealTimeWhileWaiting() {
    if (!on) return;
    sched_param sp{0};
    pthread_setschedparam(pthread_self(), SCHED_OTHER, &sp);
    setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), -10);
  }
};
}  // namespace

// No heartbeat here: if JavaScript never releases a batch, the watchdog must
// still see a stalled capture (faults are served until the reserve runs out).
bool Session::WaitScanRoom(Failure* f) {
  RealTimeWhileWaiting rt;
  while (!pool.ScanRoom()) {
    if (abort_) return f->Set(ECANCELED, "capture aborted");
    // Open batches go out only when JavaScript has nothing else to write: then
    // it frees them at once (a pool of 2 batches needs that to make progress),
    // while publishing a batch per fault when it lags would spend a whole
    // batch on a few pages and use up the reserve (Redis: 941 faults, 64 MiB).
    if (!open_.empty() && pool.ReadyCount() == 0) PublishAll();
    pollfd p[2] = {{uffd_.load(), POLLIN, 0}, {pool.ReleasedFd(), POLLIN, 0}};
    if (poll(p, 2, 100) < 0 && errno != EINTR) return f->Set(errno, "poll (capture waiting for buffers)");
    if (p[1].revents & POLLIN) pool.ClearReleased();  // before ScanRoom looks again
    // No event queued as of now: a later fault's wait is counted from here,
    // not from the last Drain, up to 100 ms ago.
    if (!(p[0].revents & POLLIN)) { lastLook_ = NowMs(); continue; }
    if (!Drain(f) || !HandleFaults(f)) return false;
  }
  return true;
}

}  // namespace bgsnap
