// Chains of generations (issue 10; README, "Snapshot chains"): one userfaultfd
// stays armed, in synchronous write-protect mode, for the whole chain.
//
// Generation 1 is the full capture, except that saved pages keep their
// protection (saver.cc: the scan does not un-protect; a fault un-protects only
// the page written, or its huge page). So at any time a page of a tracked
// block is write-protected exactly when nobody wrote it since its generation's
// instant. Between generations this thread serves the userfaultfd: a write
// fault only un-protects the page and wakes the writer (nothing to save: the
// page's content at the last instant is already out); layout events (REMOVE,
// UNMAP, REMAP) are remembered as ranges to read again.
//
// Generation N+1: freeze, re-read the layout (a mapping whose bounds,
// permissions or path changed is a new block, captured whole; the old one is
// dead), ask the kernel which pages are not write-protected (PAGEMAP_SCAN's
// PAGE_IS_WRITTEN, as protect.cc does for the snapshot freeze): those, plus
// what layout events touched, are the dirty set. It is write-protected again,
// the target runs on, and the saver saves exactly the dirty set with the same
// fault-first logic as generation 1. If bgsnap dies at any point, the kernel
// closes the userfaultfd, which drops every protection and wakes every writer.
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>

#include "procfs.h"
#include "session.h"

namespace bgsnap {

static constexpr uint64_t kMergeGap = 8 * kPage;  // as protect.cc: re-protecting 8 pages costs one ioctl

void Session::RequestGeneration() {
  genWanted_ = true;
  std::lock_guard<std::mutex> lock(fdMu_);
  uint64_t one = 1;
  if (genFd_ >= 0 && write(genFd_, &one, sizeof one) < 0) {}  // the flag is what counts
}

// Runs after generation 1 was saved, until JavaScript closes the capture (a
// clean end between generations) or something fails.
bool Session::Chain(Failure* f) {
  {
    std::lock_guard<std::mutex> lock(fdMu_);
    genFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  }
  if (genFd_ < 0) return f->Set(errno, "eventfd for generation requests");
  bool ok = true;
  while (ok) {
    PublishAll();
    genDone_ = gen_.load();  // after the last batch: nextBuffer says null only then
    notify_();
    if (savedInFreeze_ || !WaitForRequest(f)) break;  // pre-copy: the snapshot is out
    scannedBytes_ = 0;
    ok = NextFreeze(f);
    if (ok && !savedInFreeze_) {
      int nice0 = syncFinish_ ? ScanAhead() : 0;
      notify_(), ok = SaverLoop(f);
      if (syncFinish_) setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), nice0);
    }
  }
  std::lock_guard<std::mutex> lock(fdMu_);
  close(genFd_);
  genFd_ = -1;
  return !f->failed();
}

// A finish's save after its stop: until the scan reaches a page, the target's
// next write there waits for a round trip through the fault server (~50 us
// seen from the writer: two wake-ups on busy cores), so this scan runs ahead
// of the target's threads, at nice -10 (root only; else as it was). Redis's
// clients, 5 same-run rounds: p99 0.75-1.27 ms (median 1.05) with it, 1.10-2.33
// (1.73) without; BGSAVE's 0.66-0.91 (bench/RESULTS.md). Returns the old nice.
int Session::ScanAhead() {
  errno = 0;
  int was = getpriority(PRIO_PROCESS, static_cast<id_t>(gettid()));
  if (errno) was = 0;
  if (was > -10) setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), -10);
  return was;
}

// Serve the target's faults and layout events until the next generation is
// wanted. False: aborted (not a failure: the chain ends between generations)
// or the userfaultfd failed.
bool Session::WaitForRequest(Failure* f) {
  while (!abort_) {
    heartbeat_ = NowMs();
    if (genWanted_.exchange(false)) return true;
    pollfd p[2] = {{uffd_.load(), POLLIN, 0}, {genFd_, POLLIN, 0}};
    poll(p, 2, preFaults_.empty() ? 100 : 1);
    uint64_t n;
    if ((p[1].revents & POLLIN) && read(genFd_, &n, sizeof n) < 0) {}  // drained; the flag says it
    if (!ServeBetween(f)) return false;
  }
  return false;
}

// Between generations every page is saved: a writer only needs its page
// un-protected (which makes it dirty for the next generation) and woken.
// EAGAIN (a layout change in flight) is retried on the next round.
bool Session::ServeBetween(Failure* f) {
  auto on = [this](const uffd_msg& m) {
    if (m.event == UFFD_EVENT_PAGEFAULT) {
      preFaults_.push_back(m.arg.pagefault.address);
      counters.faults++;
    } else if (m.event == UFFD_EVENT_REMOVE || m.event == UFFD_EVENT_UNMAP) {
      (m.event == UFFD_EVENT_UNMAP ? counters.unmapEvents : counters.removeEvents)++;
      NoteLayout(m.arg.remove.start, m.arg.remove.end);
    } else if (m.event == UFFD_EVENT_REMAP) {
      counters.remapEvents++;
      NoteLayout(m.arg.remap.from, m.arg.remap.from + m.arg.remap.len);
      NoteLayout(m.arg.remap.to, m.arg.remap.to + m.arg.remap.len);
    }
  };
  // Pre-copy's finish: layout events also come from what is still on the
  // asynchronous userfaultfd (StagedMove), whose faults the kernel resolves.
  int async = asyncUffd_.load();
  if (!ReadEvents(f, on) || (async >= 0 && !ReadEvents(f, on, async))) return false;
  RetryUnprotects();
  return true;
}

// A written page whose content at the last instant is saved: un-protecting it
// (a huge page whole: un-protecting part of it would split it) wakes its
// writer, and leaves it dirty for the next generation. EAGAIN (a layout event
// of the target in flight) is retried after the next read of events, never
// waited for here and never answered by unregistering as a single capture's
// Release does: that would stop tracking the range and split the mapping, and
// under an allocator's storm of events it cost thousands of splits.
void Session::ChainUnprotect(uint64_t addr) {
  uint64_t len = HugeAt(pagemapFd_, addr) == 1 ? kHuge : kPage;
  int err = WpIoctl(addr & ~(len - 1), len, false);
  if (err == EAGAIN) {
    counters.eagain++;
    preFaults_.push_back(addr);
  } else if (err) {
    Wake(addr);  // unmapped or no longer ours: let it fault again and see why
  }
}

void Session::RetryUnprotects() {
  std::vector<uint64_t> todo;
  todo.swap(preFaults_);
  for (uint64_t a : todo) ChainUnprotect(a);
}

// Pages there lost or changed their content without a write fault (dropped,
// unmapped, or moved in by mremap with their protection): read them again.
void Session::NoteLayout(uint64_t start, uint64_t end) {
  if (!opts_.chain) return;
  if (!layoutSince_.empty() && start <= layoutSince_.back().second && end >= layoutSince_.back().first) {
    layoutSince_.back() = {std::min(start, layoutSince_.back().first), std::max(end, layoutSince_.back().second)};
  } else {
    layoutSince_.push_back({start, end});
  }
}

// The next generation's instant: the freeze of generation 1 without the
// injection (the userfaultfd is still there) and with the dirty set in place
// of everything.
bool Session::NextFreeze(Failure* f) {
  frozen_ = false;  // captureInfo leaves maps, blocks and threads alone until the instant is taken
  FreezeStats first = freeze;  // how generation 1 planted the userfaultfd stays true
  freeze = FreezeStats();
  freeze.stops = 1;
  freeze.uffdVia = first.uffdVia;
  freeze.seccompSuspended = first.seccompSuspended;
  freeze.sysctlToggled = first.sysctlToggled;
  LastPass();
  // Outside the pause; re-read in it only if the layout changed. A pass keeps
  // the last stop's: smaps walks every page table (~10 ms a pass for Redis's
  // 460 MiB), and what is written meanwhile is the next pass's work.
  Failure ignored;
  if (!freeze.pass) ReadSmaps(false, &ignored);
  // A pre-copy's snapshot protects nothing ahead: it is saved inside its stop,
  // or protected there for a finish. Before that stop the output takes back
  // every buffer: the save in the stop never waits for it, nor the finish's
  // first faults.
  bool snapshot = opts_.precopy && !freeze.pass;
  if ((!snapshot && !PreDirty(f)) || (snapshot && !WaitOutput(f)) || !helper_.Start(f)) return false;
  bool ok = (!syncFinish_ || StagedMove(f)) && StopForGeneration(f);
  helper_.Stop();
  if (ok && !savedInFreeze_ && !stopSaved_) gen_++, PublishHeld(true), frozen_ = true;  // else begun in the stop
  if (!ok) PublishHeld(false);
  return ok;
}

// The stop itself: its duration is the target's pause.
bool Session::StopForGeneration(Failure* f) {
  RealTime(true);
  double t0 = NowMs();
  std::function<void()> serve = [this] { Failure ig; ServeBetween(&ig); };
  bool ok = helper_.Freeze(0, false, f, serve, uffd_.load());
  timeval tv;
  gettimeofday(&tv, nullptr);
  freeze.snapshotTime = tv.tv_sec * 1e3 + tv.tv_usec / 1e3;
  freeze.faultsBefore = counters.faults;
  freeze.seizeMs = NowMs() - t0;
  freeze.rounds = helper_.rounds();
  ok = ok && ServeBetween(f);
  preFaults_.clear();  // their threads fault again after the freeze, served by the saver
  maps.clear();
  ok = ok && ReadProcState(f) && RecheckSmaps(f) && FrozenNext(f);
  double held = Hold("frozen", ok);
  if (ok && PrecopySnapshot()) ok = SaveInFreeze(f);
  if (ok && !stopSave_.empty()) ok = SaveWrittenInStop(f);
  ok = Thaw(ok, f);
  freeze.snapshotMs = freeze.totalMs = NowMs() - t0 - held;
  return ok;
}

// While the target still runs: write-protect again what was written since the
// last instant, and remember it (it is dirty whatever happens next), so the
// freeze protects only what is written meanwhile. Generation 1's
// pre-protection does the same for the same reason (protect.cc): protecting
// 4 KiB pages costs ~15 ms per GiB on two cores, the bulk of a freeze. Writers
// faulting meanwhile are let go (ServePre serves them as between generations).
bool Session::PreDirty(Failure* f) {
  double t0 = NowMs();
  preDirty_.clear();
  if (!opts_.preProtect) return true;  // benchmarks' "before": all of it inside the freeze
  uint64_t pages = 0;
  auto note = [&](uint64_t s, uint64_t e) {
    pages += (e - s) / kPage;
    preDirty_.push_back({s, e});
  };
  // Pre-copy: found and protected again in one walk of the kernel's. A mapping
  // the target replaced meanwhile is skipped: the stop reads the layout again.
  if (opts_.precopy) {
    bool ok = ForWritten(note, f, true);
    freeze.preProtectMs = NowMs() - t0;
    return ok;
  }
  bool found = ForWritten(note, f);
  if (!found) return false;
  if (pages < opts_.preDirtyMinPages) {  // 16 MiB by default: below, cheaper inside the freeze than a round of threads here
    preDirty_.clear();
    return true;
  }
  // Exactly the runs found, never merged across the clean pages between them
  // (as the freeze may): one of those may be written and un-protected while
  // we protect, and protecting it again would hide that write from the freeze.
  bool ok = ProtectRanges(preDirty_, true, f);
  freeze.preProtectMs = NowMs() - t0;
  return ok;
}

// Runs of pages written since their protection (not write-protected) that
// hold memory (present or swapped), in every live protected block.
bool Session::ForWritten(const std::function<void(uint64_t, uint64_t)>& fn, Failure* f, bool protect) {
  for (const Block& b : blocks) {
    if (b.dead || b.kind != BlockKind::kProtected) continue;
    auto run = [&](uint64_t s, uint64_t e, uint64_t c) {
      if (c & (kPageIsPresent | kPageIsSwapped)) fn(s, e);
    };
    uint64_t end = b.start + b.length;
    bool ok = protect ? ProtectWritten(pagemapFd_, b.start, end, false, run, f) : ScanUnprotected(pagemapFd_, b.start, end, run, f);
    if (!ok) return false;
  }
  return true;
}

bool Session::FrozenNext(Failure* f) {
  double t0 = NowMs();
  std::vector<std::vector<uint8_t>> prev(blocks.size());
  for (size_t i = 0; i < blocks.size(); i++) prev[i].swap(blocks[i].copy);
  bool ok = Relayout(f);
  double t1 = NowMs();
  ok = ok && MarkDirty(f) && ScanUntouched(f) && ShmemHoles(f);
  double t2 = NowMs();
  ok = ok && CopyFrozen(f);
  if (ok) KeepUnchangedCopies(&prev);
  freeze.registerMs = t1 - t0;
  freeze.protectMs = t2 - t1 - freeze.pagemapMs;
  freeze.copyMs = NowMs() - t2;
  layoutSince_.clear();
  preDirty_.clear();
  RebuildSegments();
  return ok;
}

// Match the mappings now against the live blocks by name (bounds, permissions,
// path). A match is the same block, still registered the same way; anything
// else is a new block, and the unmatched live blocks are dead from now on.
bool Session::Relayout(Failure* f) {
  std::map<std::string, int> live;
  for (size_t i = 0; i < blocks.size(); i++) if (!blocks[i].dead) live[blocks[i].name] = static_cast<int>(i);
  firstNew_ = blocks.size();
  std::vector<bool> kept(blocks.size(), false);
  for (size_t i = 0; i < maps.size(); i++) {
    std::string why;
    auto it = Skippable(maps[i], &why) ? live.end() : live.find(BlockName(maps[i]));
    if (it != live.end() && !kept[it->second] && KeepBlock(it->second, i)) {
      kept[it->second] = true;
    } else if (!PlanBlock(i, f)) {
      return false;
    }
  }
  for (size_t i = 0; i < firstNew_; i++) {
    Block& b = blocks[i];
    if (b.dead || kept[i]) continue;
    b.dead = true;
    b.map = -1;
    b.done.Resize(0);
    b.zeroPending.Resize(0);
  }
  return true;
}

// The same block when the kernel still registers it as before (idempotent for
// a range already ours). Protected: saved unless dirty (MarkDirty); copied:
// compared with its last copy (KeepUnchangedCopies).
bool Session::KeepBlock(int bi, size_t mi) {
  Block& b = blocks[bi];
  MapEntry& m = maps[mi];
  uffdio_register reg{{m.start, m.end - m.start}, UFFDIO_REGISTER_MODE_WP, 0};
  bool registered = ioctl(b.onAsync ? asyncUffd_.load() : uffd_.load(), UFFDIO_REGISTER, &reg) == 0;
  int err = errno;
  if (registered != (b.kind == BlockKind::kProtected)) return false;
  m.how = registered ? "protected" : err == EINVAL ? "copied: not protectable" : "copied: registered by the target";
  m.block = bi;
  b.map = static_cast<int>(mi);
  b.kind == BlockKind::kProtected ? b.done.SetRange(0, b.pages) : b.done.ClearRange(0, b.pages);
  b.zeroPending.ClearRange(0, b.pages);
  return true;
}

// Which pages of each protected block to save: for a kept block, those not
// write-protected (written since the last instant) and those a layout event
// touched; for a new block, all of it (never-touched anonymous pages as zero,
// unread). Everything to save is write-protected before the target runs.
bool Session::MarkDirty(Failure* f) {
  double t0 = NowMs();
  std::vector<Range> todo;
  bool passWalk = opts_.precopy && freeze.pass;  // a pass protects what it finds in the same walk
  bool sorted = std::adjacent_find(preDirty_.begin(), preDirty_.end(), [](const Range& a, const Range& b) {
    return b.first < a.second;  // ascending and disjoint, as PreDirty finds them in blocks in address order
  }) == preDirty_.end();
  for (size_t i = 0; i < blocks.size(); i++) {
    Block& b = blocks[i];
    if (b.dead || b.kind != BlockKind::kProtected) continue;
    bool kept = i < firstNew_;
    if (passWalk && kept && !Touches(b, layoutSince_)) {  // no walk: see Touches
      DirtyRanges(&b, preDirty_, sorted);
      continue;
    }
    size_t first = todo.size();  // runs merge within a block only: the gap between two may be unmapped
    auto run = [&](uint64_t s, uint64_t e, uint64_t c) { DirtyRun(static_cast<int>(i), s, e, c, kept, first, &todo); };
    uint64_t end = b.start + b.length;
    // Stopped, every block is exactly a mapping registered by Relayout: strict.
    bool ok = passWalk ? ProtectWritten(pagemapFd_, b.start, end, true, run, f) : ScanUnprotected(pagemapFd_, b.start, end, run, f);
    if (!ok) return false;
    if (kept) DirtyRanges(&b, layoutSince_), DirtyRanges(&b, preDirty_, sorted);
  }
  freeze.pagemapMs = NowMs() - t0;
  freeze.reprotectRanges = todo.size();
  if (PrecopySnapshot() || passWalk) return true;  // saved before the target runs again, or protected already
  if (syncFinish_) return FinishDirty(&todo, f);
  return ProtectRanges(todo, false, f);
}

// A pass's stop does not walk a kept block that no layout event touched: what
// PreDirty found and protected again just before is this pass's, and what was
// written since is still shown written, so the next pass or the snapshot
// (which walks everything) reads it; a pass is fuzzy anyway. The walk
// protecting it cost Redis's pass stops ~1.3 ms of 2.5 (165k pages; a TLB
// flush, an IPI in a guest, per 2 MiB written). A touched block is walked:
// its dropped pages must be found as zero, never read (reading allocates).
bool Session::Touches(const Block& b, const std::vector<Range>& ranges) {
  for (const Range& r : ranges) {
    if (r.first < b.start + b.length && r.second > b.start) return true;
  }
  return false;
}

// Pages of a kept block in `ranges` are saved again: what layout events
// touched, and what PreDirty protected again before the freeze. `sorted`
// ranges (PreDirty's, ascending and disjoint) are searched, not all visited
// per block: Redis's ~10-45k runs times its 42 blocks took ~1 ms of each pass's stop.
void Session::DirtyRanges(Block* b, const std::vector<Range>& ranges, bool sorted) {
  uint64_t end = b->start + b->length;
  auto it = !sorted ? ranges.begin() : std::upper_bound(ranges.begin(), ranges.end(), b->start,
                                                        [](uint64_t a, const Range& r) { return a < r.second; });
  for (; it != ranges.end() && (!sorted || it->first < end); ++it) {
    uint64_t a = std::max(it->first, b->start), z = std::min(it->second, end);
    if (a < z) b->done.ClearRange(static_cast<uint32_t>((a - b->start) / kPage), static_cast<uint32_t>((z - b->start + kPage - 1) / kPage));
  }
}

// One run of pages the kernel reports not write-protected.
void Session::DirtyRun(int bi, uint64_t s, uint64_t e, uint64_t cats, bool kept, size_t first, std::vector<Range>* todo) {
  Block& b = blocks[bi];
  if (cats & kPageIsHuge) b.thp = true;
  uint32_t p0 = static_cast<uint32_t>((s - b.start) / kPage), p1 = static_cast<uint32_t>((e - b.start) / kPage);
  if (!(cats & (kPageIsPresent | kPageIsSwapped)) && b.anonPrivate) {
    // No page: zero now. In a kept block it was zero at the last instant too,
    // unless a layout event dropped it (MarkDirty then clears its done bits).
    b.zeroPending.SetRange(p0, p1);
    return;
  }
  if (kept) b.done.ClearRange(p0, p1);
  freeze.reprotectPages += p1 - p0;
  if (todo->size() > first && s - todo->back().second <= kMergeGap) todo->back().second = e;
  else todo->push_back({s, e});
}

// Copied blocks (private file mappings, ranges the target registered itself)
// cannot be tracked: they are copied at every instant, and pages equal to the
// last generation's copy are not sent again.
void Session::KeepUnchangedCopies(std::vector<std::vector<uint8_t>>* prev) {
  for (size_t i = 0; i < firstNew_ && i < prev->size(); i++) {
    Block& b = blocks[i];
    const std::vector<uint8_t>& old = (*prev)[i];
    if (b.dead || b.kind != BlockKind::kCopied || old.size() != b.copy.size()) continue;
    for (uint32_t p = 0; p < b.pages; p++) {
      if (memcmp(old.data() + uint64_t(p) * kPage, b.copy.data() + uint64_t(p) * kPage, kPage) == 0) b.done.Set(p);
    }
  }
}

void Session::RebuildSegments() {
  segs_.clear();
  for (size_t i = 0; i < blocks.size(); i++) {
    const Block& b = blocks[i];
    if (!b.dead && b.kind == BlockKind::kProtected) segs_.push_back({b.start, b.start + b.length, static_cast<int>(i), 0});
  }
  std::sort(segs_.begin(), segs_.end(), [](const Segment& a, const Segment& b) { return a.start < b.start; });
}

}  // namespace bgsnap
