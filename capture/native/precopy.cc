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
// (LastPass; memory moves there piece by piece first: StagedMove; the stop:
// FinishDirty), as a capture without pre-copy saves everything.
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/resource.h>
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

// The passes are work no writer waits for, so the saver runs them 10 nicer
// than it was (on), and back as it was once the finish begins (off): where the
// target's threads want the CPU during the passes, they get it first. The
// finish's move serves writers from this thread (ServeFor), its scan goes up
// to -10 (ScanAhead), and the fault server is SCHED_FIFO. Root only: going
// back up needs CAP_SYS_NICE. Redis's clients (bench/redis-clients.js), the
// whole capture niced: p99 0.86 / 0.72 / 1.03 / 0.73 ms against 1.51 / 1.24 /
// 0.84 / 0.92, 4 hand-run rounds side by side.
void Session::PassNice(bool on) {
  id_t tid = static_cast<id_t>(gettid());
  if (!on) {
    if (passNiceWas_ != 100) setpriority(PRIO_PROCESS, tid, passNiceWas_);
    passNiceWas_ = 100;
    return;
  }
  errno = 0;
  int was = getpriority(PRIO_PROCESS, tid);
  if (geteuid() != 0 || errno != 0) return;
  if (setpriority(PRIO_PROCESS, tid, std::min(19, was + 10)) == 0) passNiceWas_ = was;
}

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

// The most a stop saves itself: precopyFinalPages, and never more than half
// the buffers (the output took every buffer back before it: WaitOutput).
uint64_t Session::StopSaveLimit() const {
  return std::min<uint64_t>(opts_.precopyFinalPages, uint64_t(opts_.bufferMb) * (1 << 20) / kPage / 2);
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
  if (pages <= StopSaveLimit()) return;
  if (gen_.load() < static_cast<int>(opts_.precopyMaxPasses)) {
    freeze.pass = true;
    return;
  }
  syncFinish_ = freeze.syncFinish = true;
}

// The finish, before its stop: moving memory from the asynchronous userfaultfd
// to the synchronous one walks every page table entry twice (unregistering
// clears the asynchronous protection, ~0.08 us a page; then all of it is
// protected again), so anonymous memory moves a piece per short stop
// (precopyMoveMb, 2 MiB aligned: no huge page is split) instead of all of it
// in the snapshot's: Redis's 165k pages cost that stop ~13 ms, on top of the
// ~4 ms of protecting what was written. Each piece's stop notes what was
// written in it since the last pass (preDirty_, saved by the snapshot) and
// protects all of it on the synchronous userfaultfd, which from then on
// serves its writers as between generations: un-protected at once, so dirty
// for the snapshot. What is not anonymous (only the asynchronous mode takes
// private file mappings), what fits one piece, and a piece the target changed
// meanwhile are left to the snapshot's stop (SwitchToSync, Relayout).
bool Session::StagedMove(Failure* f) {
  if (syncUffd_ < 0) return f->Set(EBADF, "pre-copy's synchronous userfaultfd is missing");
  PassNice(false);
  {
    std::lock_guard<std::mutex> lock(fdMu_);  // the watchdog's numbers follow (CloseUffd)
    asyncUffd_ = uffd_.load();
    uffd_ = syncUffd_;
    syncUffd_ = -1;
  }
  pool.KeepReserve();  // the finish's first faults find a batch
  uint64_t piece = std::max<uint64_t>(opts_.precopyMoveMb, 2) << 20, anon = 0;
  for (Block& b : blocks) {
    b.onAsync = !b.dead && b.kind == BlockKind::kProtected;
    if (b.onAsync && b.anonPrivate) anon += b.length;
  }
  if (anon <= piece) return true;  // one piece: as cheap in the snapshot's stop
  double t0 = NowMs();
  std::vector<MovingPiece> stop;  // small blocks share a stop
  uint64_t inStop = 0;
  for (Block& b : blocks) {
    if (!b.onAsync || !b.anonPrivate) continue;
    for (uint64_t s = b.start, end = b.start + b.length; s < end;) {
      uint64_t e = std::min(end, (s + piece - inStop) & ~(kHuge - 1));
      bool took = e > s;
      if (took) stop.push_back({&b, s, e}), inStop += e - s, s = e;
      if (took && inStop < piece) continue;
      if (!MoveStop(&stop, f)) return false;  // full, or its room ends before a 2 MiB boundary
      inStop = 0;
    }
  }
  if (!stop.empty() && !MoveStop(&stop, f)) return false;
  freeze.moveMs = NowMs() - t0;
  Hold("move");  // tests: killed with every writer's memory on the synchronous userfaultfd
  return true;
}

// One stop moving `pieces`; then the target runs as long as the stop lasted
// (at least a millisecond), so the finish never holds it more than half the
// time. Only then is what the stop found written read (SideRead), the target
// running on and its faults served between reads: a variant that counted the
// reads' time in that run let one Redis request span two stops (35.8 ms).
// A block is off the asynchronous userfaultfd once a piece moved: split (the
// snapshot's Relayout then finds new mappings, saved whole) or whole.
bool Session::MoveStop(std::vector<MovingPiece>* pieces, Failure* f) {
  RealTime(true);
  double t0 = NowMs();
  std::function<void()> serve = [this] { Failure ig; ServeBetween(&ig); };
  bool ok = helper_.Freeze(0, false, f, serve, uffd_.load()) && ServeBetween(f);
  size_t from = preDirty_.size();  // what MovePiece finds written: read after the target's run (SideRead)
  for (const MovingPiece& x : *pieces) {
    if (ok && MovePiece(x.start, x.end)) x.block->onAsync = false;
  }
  pieces->clear();
  ok = Thaw(ok, f);
  double ms = NowMs() - t0;
  freeze.moveStops++;
  freeze.moveMaxMs = std::max(freeze.moveMaxMs, ms);
  return ok && ServeFor(std::max(ms, 1.0), f) && SideRead(from, f);
}

// With the target stopped; true once moved. Not moved when the kernel refuses
// the first step, the range being no longer what the block was: it stays on
// the asynchronous userfaultfd. A refusal after it leaves the range untracked
// or partly protected: pages without protection are all saved by the snapshot
// (they read as written), and what protection holds still means unwritten.
bool Session::MovePiece(uint64_t start, uint64_t end) {
  Failure scan;  // a range the target unmapped meanwhile: left as it is
  bool ok = ScanUnprotected(pagemapFd_, start, end, [this](uint64_t s, uint64_t e, uint64_t c) {
    if (c & (kPageIsPresent | kPageIsSwapped)) preDirty_.push_back({s, e});
  }, &scan);
  uffdio_range r{start, end - start};
  if (!ok || ioctl(asyncUffd_.load(), UFFDIO_UNREGISTER, &r) != 0) return false;
  uffdio_register reg{{start, end - start}, UFFDIO_REGISTER_MODE_WP, 0};
  if (ioctl(uffd_.load(), UFFDIO_REGISTER, &reg) == 0) WpIoctl(start, end - start, true);
  return true;
}

// Serve the target's faults and layout events on both userfaultfds for `ms`.
bool Session::ServeFor(double ms, Failure* f) {
  for (double until = NowMs() + ms;;) {
    heartbeat_ = NowMs();
    if (abort_) return f->Set(ECANCELED, "capture aborted");
    if (!ServeBetween(f)) return false;
    double left = until - NowMs();
    if (left <= 0) return true;
    pollfd p[2] = {{uffd_.load(), POLLIN, 0}, {asyncUffd_.load(), POLLIN, 0}};
    poll(p, 2, preFaults_.empty() ? static_cast<int>(left) + 1 : 1);
  }
}

// The finish's stop, with `todo` what MarkDirty found unprotected: in moved
// memory, what the target wrote since its piece moved (its writers were let go
// at once). That is what it writes most, so what it would fault on first once
// it runs: Redis's slowest request waited 8-16 ms after the stop for those
// copies. Small enough (as a pre-copy snapshot's: precopyFinalPages, half the
// buffers), it is saved in this stop and needs no protection; what was written
// before the pieces moved is protected since then, and goes out with faults.
bool Session::FinishDirty(std::vector<Range>* todo, Failure* f) {
  uint64_t pages = 0;
  for (const Range& r : *todo) pages += (r.second - r.first) / kPage;
  stopSave_.clear();
  if (pages <= StopSaveLimit()) stopSave_.swap(*todo), freeze.stopPages = pages;
  return SwitchToSync(todo, f) && ProtectRanges(*todo, false, f);
}

// Saves stopSave_ with the target stopped: the generation begins here, and the
// saver (gathering scattered pages as a pre-copy snapshot's stop does) sees
// only those pages as left to save; the rest of the dirty set is hidden as
// done meanwhile, and saved after the thaw.
bool Session::SaveWrittenInStop(Failure* f) {
  std::vector<Bitmap> was(blocks.size());
  for (size_t i = 0; i < blocks.size(); i++) {
    Block& b = blocks[i];
    if (b.dead || b.kind != BlockKind::kProtected) continue;
    was[i] = b.done;
    b.done.SetRange(0, b.pages);
  }
  std::vector<std::pair<int, std::pair<uint32_t, uint32_t>>> now;
  for (const Range& r : stopSave_) {
    const Segment* s = FindSeg(r.first);
    if (!s || s->end < r.second) continue;  // never: a run is within one block, stopped
    uint32_t p0 = s->firstPage + static_cast<uint32_t>((r.first - s->start) / kPage);
    uint32_t p1 = p0 + static_cast<uint32_t>((r.second - r.first) / kPage);
    for (uint32_t p = was[s->block].NextClear(p0, p1); p < p1; p = was[s->block].NextClear(p + 1, p1)) blocks[s->block].done.Clear(p);
    now.push_back({s->block, {p0, p1}});
  }
  bool ok = SaveInFreeze(f, false);
  scannedBytes_ = 0;  // the pace after the thaw counts from there
  for (size_t i = 0; i < blocks.size(); i++) if (!was[i].Empty()) blocks[i].done = was[i];
  for (const auto& x : now) blocks[x.first].done.SetRange(x.second.first, x.second.second);
  stopSave_.clear();
  return ok;
}

// The snapshot's stop, finishing with faults: what is still on the
// asynchronous userfaultfd moves to the synchronous one (unregistering clears
// the asynchronous protection; MarkDirty has read what it showed), and the
// caller protects `todo`, the dirty set, there. What layout events touched in
// those blocks is saved again too and so joins it: its old protection went
// with the move.
bool Session::SwitchToSync(std::vector<Range>* todo, Failure* f) {
  std::vector<Range> copied;
  for (size_t i = 0; i < blocks.size(); i++) {
    Block& b = blocks[i];
    if (b.dead || b.kind != BlockKind::kProtected || !b.onAsync) continue;
    // A mapping new in this stop but ours on the asynchronous one (the target
    // split or re-protected a block) is saved whole: all of it is protected,
    // not only what its old protection showed written.
    if (i >= firstNew_) todo->push_back({b.start, b.start + b.length});
    for (const Range& x : layoutSince_) {
      uint64_t s = std::max(x.first, b.start), e = std::min(x.second, b.start + b.length);
      if (s < e) todo->push_back({s, e});
    }
    if (!MoveToSync(&b, f)) return false;
    if (b.kind == BlockKind::kCopied) copied.push_back({b.start, b.start + b.length});
  }
  todo->erase(std::remove_if(todo->begin(), todo->end(), [&](const Range& x) {
    for (const Range& c : copied) if (x.first >= c.first && x.first < c.second) return true;
    return false;
  }), todo->end());
  std::lock_guard<std::mutex> lock(fdMu_);
  int async = asyncUffd_.exchange(-1);
  if (async >= 0) close(async);
  return true;
}

// Only the asynchronous mode takes private file mappings (a program's .data):
// such a block is copied in this stop instead (CopyFrozen), as a capture
// without pre-copy copies them; what it sends is still only what was written.
bool Session::MoveToSync(Block* b, Failure* f) {
  uffdio_range r{b->start, b->length};
  if (ioctl(asyncUffd_.load(), UFFDIO_UNREGISTER, &r) != 0) return f->Set(errno, "moving " + b->name + " off the pre-copy's userfaultfd");
  b->onAsync = false;
  uffdio_register reg{{b->start, b->length}, UFFDIO_REGISTER_MODE_WP, 0};
  if (ioctl(uffd_.load(), UFFDIO_REGISTER, &reg) == 0) return true;
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
// exactly the dirty set; nothing can write it before the thaw. `whole`: all
// of the generation (a pre-copy snapshot); else only its first part (the
// finish's: SaveWrittenInStop), the rest saved after the thaw.
bool Session::SaveInFreeze(Failure* f, bool whole) {
  NoteThreads();  // the state JavaScript reads now is this stop's
  gen_++;
  PublishHeld(true);  // the generation's first batches: read during the move
  frozen_ = true;
  (whole ? savedInFreeze_ : stopSaved_) = true;
  stopSaving_ = !whole;
  notify_();
  double t0 = NowMs();
  bool ok = SaverLoop(f);
  freeze.copyMs += NowMs() - t0;
  stopSaving_ = false;
  return ok;
}

}  // namespace bgsnap
