// Pre-copy (`--precopy`): the target's writers never wait on us during its
// passes. The chain's userfaultfd is opened with UFFD_FEATURE_WP_ASYNC, so a
// write to a protected page is resolved by the kernel itself (~1.5 us,
// bench/tracking-cost.js) and only leaves the page marked written.
// Generation 1 reads everything while the target runs, each later generation
// what was written since the previous one was protected again; these are
// passes (fuzzy: read at different moments). When what was written since the
// last pass is small (precopyFinalPages), the next generation is the
// snapshot: its dirty set is saved inside its stop, so generation K read back
// (each page's newest record) is the memory at that stop. This is live
// migration's pre-copy, applied to a process: against write-protect faults
// served by a thread (Redis under SET load: 10-26k faults of 7-200 us each
// during a capture), a writer pays a kernel fault per page per pass, and the
// one stop copies what the last pass left. A target whose writes keep pace
// with the output never gets small enough: after the last pass its snapshot
// is finished with synchronous write-protect faults on a second userfaultfd
// (LastPass, SwitchToSync), as a capture without pre-copy saves everything.
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "procfs.h"
#include "session.h"

namespace bgsnap {

// Pages of the ranges layout events touched since the last stop that are there
// now: a dropped page not touched again is a zero record, nothing to read, and
// an allocator's storm notes the same scratch ranges over and over (counting
// every range whole refused a converging target: test/precopy, storm mode).
uint64_t Session::LayoutPresent(Failure* scan) {
  std::vector<Range> r = layoutSince_;
  std::sort(r.begin(), r.end());
  uint64_t pages = 0, upTo = 0;
  for (const Range& x : r) {
    uint64_t a = std::max(x.first, upTo);
    if (a >= x.second) continue;
    upTo = x.second;
    ScanPagemap(pagemapFd_, a, x.second, kPageIsPresent, kPageIsPresent, [&](uint64_t s, uint64_t e, uint64_t) {
      pages += (e - s) / kPage;
    }, scan);
  }
  return pages;
}

// Between generations, while the target runs: how much the next stop would
// have to save, and so whether it is the snapshot or another pass. Small
// enough (precopyFinalPages, and never more than half the buffers: the stop
// must not wait on the output), the stop saves it. After the last pass, a
// target that still writes more than that is not stopped for longer: the
// snapshot's stop only protects what was written, on the second userfaultfd
// in synchronous mode, and those pages go out as a capture without pre-copy
// saves everything (a writer waits for its page's copy). Redis under SET load
// settled at 6-15k written pages a pass writing to a file, 38-60k piped to a
// receiver on the same two cores: stops of 15-46 ms saving them, or a refusal.
void Session::LastPass() {
  freeze.pass = false;
  if (!opts_.precopy) return;
  uint64_t pages = 0;
  Failure scan;  // an estimate: a range unmapped meanwhile only makes it rougher
  ForWritten([&](uint64_t s, uint64_t e) { pages += (e - s) / kPage; }, &scan);
  pages += LayoutPresent(&scan);
  freeze.dirtyBefore = pages;
  uint64_t cap = uint64_t(opts_.bufferMb) * (1 << 20) / kPage / 2;
  if (pages <= std::min<uint64_t>(opts_.precopyFinalPages, cap)) return;
  if (gen_.load() < static_cast<int>(opts_.precopyMaxPasses)) {
    freeze.pass = true;
    return;
  }
  // The finish's stop walks all the protected memory (unregistering: ~13 ms
  // for Redis's 118k pages, ~0.1 us a page), the save in the stop only what
  // was written (3-9 us a page in this VM; 4922 pages took 34.7 ms): past 1
  // written page in 64, the finish is the shorter.
  uint64_t tracked = 0;
  for (const Block& b : blocks) if (!b.dead && b.kind == BlockKind::kProtected) tracked += b.pages;
  if (pages <= cap && pages * 64 < tracked) return;
  syncFinish_ = freeze.syncFinish = true;
}

// The snapshot's stop, finishing with faults: every live block moves from the
// asynchronous userfaultfd to the synchronous one (unregistering clears the
// asynchronous protection; MarkDirty has read what it showed), and the caller
// protects `todo`, the dirty set, there. What layout events touched is saved
// again too and so joins it: its old protection went with the switch. The
// faults' buffer reserve comes back.
bool Session::SwitchToSync(std::vector<Range>* todo, Failure* f) {
  int async = uffd_.load();
  if (syncUffd_ < 0) return f->Set(EBADF, "pre-copy's synchronous userfaultfd is missing");
  std::vector<Range> copied;
  for (Block& b : blocks) {
    if (b.dead || b.kind != BlockKind::kProtected) continue;
    for (const Range& x : layoutSince_) {
      uint64_t s = std::max(x.first, b.start), e = std::min(x.second, b.start + b.length);
      if (s < e) todo->push_back({s, e});
    }
    if (!MoveToSync(&b, async, f)) return false;
    if (b.kind == BlockKind::kCopied) copied.push_back({b.start, b.start + b.length});
  }
  todo->erase(std::remove_if(todo->begin(), todo->end(), [&](const Range& x) {
    for (const Range& c : copied) if (x.first >= c.first && x.first < c.second) return true;
    return false;
  }), todo->end());
  {
    std::lock_guard<std::mutex> lock(fdMu_);  // the watchdog's number follows (CloseUffd)
    uffd_ = syncUffd_;
    syncUffd_ = -1;
    close(async);
  }
  pool.KeepReserve();
  return true;
}

// Only the asynchronous mode takes private file mappings (a program's .data):
// such a block is copied in this stop instead (CopyFrozen), as a capture
// without pre-copy copies them; what it sends is still only what was written.
bool Session::MoveToSync(Block* b, int async, Failure* f) {
  uffdio_range r{b->start, b->length};
  if (ioctl(async, UFFDIO_UNREGISTER, &r) != 0) return f->Set(errno, "moving " + b->name + " off the pre-copy's userfaultfd");
  uffdio_register reg{{b->start, b->length}, UFFDIO_REGISTER_MODE_WP, 0};
  if (ioctl(syncUffd_, UFFDIO_REGISTER, &reg) == 0) return true;
  if (errno != EINVAL) return f->Set(errno, "registering " + b->name + " on the synchronous userfaultfd");
  b->kind = BlockKind::kCopied;
  maps[b->map].how = "copied: not protectable";
  return true;
}

// Before the snapshot's stop, while the target runs: the output has taken every
// batch back, so the save inside the stop never waits for it (what it saves
// fits half the pool: LastPass). Layout events are served meanwhile. Waiting
// also before passes small enough to fit (so they would read at memory speed)
// was tried: JavaScript asks for the next pass only once the output took the
// last, so passes stayed at the output's pace and the waits only let more be
// written (Redis: snapshot stops of 32 and 76 ms against 15 and 30).
bool Session::WaitOutput(Failure* f) {
  while (pool.FreeCount() < pool.batches.size()) {
    heartbeat_ = NowMs();
    if (abort_) return f->Set(ECANCELED, "capture aborted");
    pollfd p[2] = {{pool.ReleasedFd(), POLLIN, 0}, {uffd_.load(), POLLIN, 0}};
    if (poll(p, 2, 100) < 0 && errno != EINTR) return f->Set(errno, "poll (waiting for the output before the snapshot)");
    if (p[0].revents & POLLIN) pool.ClearReleased();
    if (!ServeBetween(f)) return false;
  }
  return true;
}

// The snapshot generation's save, with the target stopped: JavaScript is told
// the generation began (it drains the buffers meanwhile), and the saver reads
// exactly the dirty set; nothing can write it before the thaw.
bool Session::SaveInFreeze(Failure* f) {
  NoteThreads();  // the state JavaScript reads now is this stop's
  gen_++;
  frozen_ = true;
  savedInFreeze_ = true;
  notify_();
  double t0 = NowMs();
  bool ok = SaverLoop(f);
  freeze.copyMs += NowMs() - t0;
  return ok;
}

// The snapshot's save reads what the last pass left: pages scattered a few
// here and a few there, and one process_vm_readv (and one look at the
// userfaultfd) per run cost ~5 us a page inside the stop. Up to 256 runs go
// in one call, into the batch back to back. Nothing can change the layout
// while the target is stopped, so no event can invalidate the read. Returns
// the pages saved; 0 to take the ordinary path (no segment, a short read).
int Session::ReadGathered(int b, uint32_t p, uint32_t p1, Failure* f) {
  Block& blk = blocks[b];
  const Segment* s = SegForPage(b, p);
  Batch* bt = s ? ScanBatch(b, f) : nullptr;
  if (!bt) return f->failed() ? -1 : 0;
  uint32_t room = std::min(bt->capData - bt->dataPages, bt->capIndex - bt->count), pages = 0;
  uint32_t segEnd = s->firstPage + static_cast<uint32_t>((s->end - s->start) / kPage);
  iovec remote[256];
  uint32_t runAt[256], runLen[256], n = 0;
  for (uint32_t q = p; q < std::min(p1, segEnd) && pages < room && n < 256 && !blk.zeroPending.Test(q);) {
    uint32_t e = std::min({RunEnd(blk, q, std::min(p1, segEnd)), q + room - pages});
    remote[n] = {reinterpret_cast<void*>(s->start + uint64_t(q - s->firstPage) * kPage), (e - q) * kPage};
    runAt[n] = q, runLen[n++] = e - q;
    pages += e - q;
    q = blk.done.NextClear(e, std::min(p1, segEnd));
  }
  if (n < 2) return 0;  // one run: the ordinary read is as good
  iovec local{bt->data + uint64_t(bt->dataPages) * kPage, pages * kPage};
  if (process_vm_readv(pid_, &local, 1, remote, n, 0) != static_cast<ssize_t>(pages) * static_cast<ssize_t>(kPage)) return 0;
  uint8_t* src = static_cast<uint8_t*>(local.iov_base);
  for (uint32_t i = 0; i < n; i++) {  // zero pages compacted away move the later runs down
    uint8_t* at = bt->data + uint64_t(bt->dataPages) * kPage;
    if (at != src) memmove(at, src, uint64_t(runLen[i]) * kPage);
    src += uint64_t(runLen[i]) * kPage;
    Commit(bt, b, runAt[i], runLen[i]);
  }
  return static_cast<int>(pages);
}

}  // namespace bgsnap
