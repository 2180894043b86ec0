// The scan waits for buffer room without making faulting writers wait with it.
// Before, the saver blocked in Acquire when the batches were full of scanned
// pages the disk had not taken yet, and a writer faulting meanwhile waited for
// the disk: Redis's clients saw 207-369 ms stalls where a fork-based BGSAVE
// gave 21-30 ms. Now the scan leaves half the pool to faults and, while it
// waits, the saver keeps serving the userfaultfd.
#include <poll.h>

#include <cerrno>

#include "session.h"

namespace bgsnap {

// No heartbeat here: if JavaScript never releases a batch, the watchdog must
// still see a stalled capture (faults are served until the reserve runs out).
bool Session::WaitScanRoom(Failure* f) {
  PublishAll();  // what the scan holds open must reach JavaScript to free room
  while (!pool.ScanRoom()) {
    if (abort_) return f->Set(ECANCELED, "capture aborted");
    pollfd p[2] = {{uffd_.load(), POLLIN, 0}, {pool.ReleasedFd(), POLLIN, 0}};
    if (poll(p, 2, 100) < 0 && errno != EINTR) return f->Set(errno, "poll (capture waiting for buffers)");
    if (p[1].revents & POLLIN) pool.ClearReleased();  // before ScanRoom looks again
    if (!(p[0].revents & POLLIN)) continue;
    if (!Drain(f) || !HandleFaults(f)) return false;
    PublishAll();  // batches opened for faults count against the room awaited
  }
  return true;
}

}  // namespace bgsnap
