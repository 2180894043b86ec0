// The saver: after the target resumes, save every page exactly once. The fault
// server (fault_server.cc) serves faults (a writer is waiting: save the
// still-unchanged pages around it, un-protect, wake) while this thread scans
// linearly in aligned chunks; both work under saveMu_, which the scan lets go
// of while it reads the target.
// A page is marked done only after its read succeeded and no layout event
// (munmap, mremap, madvise) slipped in during the read; a chunk is un-protected
// only after all its pages are done. We never write into the target's memory.
#include <linux/userfaultfd.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <cerrno>
#include <cstdio>

#include "procfs.h"
#include "session.h"

namespace bgsnap {

// Saved per fault. One page per fault (unless continuing a range served
// lately) was tried: a lone random writer's wait fell from 33-131 us to 4-16
// us, but 3 busy writers' capture ran at half the speed (80-145k faults per
// 2 GiB, each an un-protect with its TLB flush) and Redis's clients' p99 was
// no better (0.74-2.20 ms against 0.90-1.50 ms with 64 KiB, same runs).
// Neither was saving the page written first and un-protecting it at once:
// with the neighbours saved right after, its writer, woken on the server's
// CPU, still waited 16-66 us; with the neighbours left to the scan, Redis
// faulted 25-31k times against 16-18k and its clients' p99 was 2.3 / 2.9 ms
// against 1.6 / 2.1 ms (one invocation, load ~1).
static constexpr uint64_t kFaultGranule = 64 << 10;

thread_local bool Session::faultMode_ = false;

static double ThreadCpuMs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

bool Session::SaverLoop(Failure* f) {
  size_t cb = 0;
  uint32_t cp = 0;
  bool held = false;
  lastLook_ = paceStart_ = NowMs();
  const double cpu0 = ThreadCpuMs(), wall0 = paceStart_;
  if (!StartFaultServer(f)) return false;
  while (!f->failed()) {
    heartbeat_ = NowMs();
    if (abort_) { f->Set(ECANCELED, "capture aborted"); break; }
    if (cb >= blocks.size()) break;
    // Inside a stop no writer can fault, so the faults' reserve is not kept:
    // waiting for it there waits for JavaScript, which is opening the
    // generation (a stop takes a batch per mapping its pages are in). Redis:
    // finish stops saving 384-816 pages took 24-30 ms in 4 captures of 13
    // with it kept, at most 8 ms in 6 of 6 without. StopSaveLimit keeps the
    // stop within half the pool, and the output took back every buffer first.
    if (!SavingInStop() && !pool.ScanRoom()) {
      double w0 = NowMs();
      if (!WaitScanRoom(f)) break;
      counters.scanWaitUs += static_cast<uint64_t>((NowMs() - w0) * 1000);
    }
    {
      std::lock_guard<PiMutex> lock(saveMu_);
      if (!ScanChunk(&cb, &cp, f)) break;
    }
    if (!held && scannedBytes_ > 0) {
      held = true;
      Hold("copy");
      // The test's stuck saver holds the saver's state, so faults wait too (a
      // fault server serving on would un-protect everything and the watchdog
      // would have nothing to release: process-watchdog-fd passed or failed by
      // how fast the writers faulted).
      std::lock_guard<PiMutex> lock(saveMu_);
      Stuck();
    }
    Pace(f);
  }
  counters.saverCpuUs += static_cast<uint64_t>((ThreadCpuMs() - cpu0) * 1000);
  counters.saverWallUs += static_cast<uint64_t>((NowMs() - wall0) * 1000);
  StopFaultServer(f);
  return !f->failed();
}

// Reads every queued userfaultfd event (the fd is non-blocking) and hands each
// to `on`. Shared by the saver and by the writers' release before the snapshot.
bool Session::ReadEvents(Failure* f, const std::function<void(const uffd_msg&)>& on, int fd) {
  if (fd < 0) fd = uffd_.load();
  if (fd < 0) return f->Set(EBADF, "userfaultfd closed by the watchdog");
  uffd_msg msgs[64];
  for (;;) {
    ssize_t n = read(fd, msgs, sizeof msgs);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    if (n < 0) return f->Set(errno, "reading userfaultfd events");
    for (size_t i = 0; i < n / sizeof(uffd_msg); i++) on(msgs[i]);
    if (static_cast<size_t>(n) < sizeof msgs) break;
  }
  return true;
}

// Layout events are applied at once (bookkeeping only); faults are queued for
// HandleFaults.
bool Session::Drain(Failure* f) {
  double look = NowMs();
  size_t queued = faults_.size();
  bool ok = ReadEvents(f, [this](const uffd_msg& m) {
    if (m.event == UFFD_EVENT_PAGEFAULT) {
      faults_.push_back({m.arg.pagefault.address, lastLook_});
      counters.faults++;
    } else if (m.event == UFFD_EVENT_REMOVE || m.event == UFFD_EVENT_UNMAP) {
      bool unmap = m.event == UFFD_EVENT_UNMAP;
      (unmap ? counters.unmapEvents : counters.removeEvents)++;
      OnRemove(m.arg.remove.start, m.arg.remove.end, unmap);
    } else if (m.event == UFFD_EVENT_REMAP) {
      counters.remapEvents++;
      OnRemap(m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
    }
  });
  if (ok) lastLook_ = look;
  if (faults_.size() > queued) KickFaultServer();  // read off the fd here: it cannot see them
  return ok;
}

void Session::CutSegments(uint64_t start, uint64_t end, std::vector<Segment>* cut) {
  std::vector<Segment> keep;
  for (const Segment& s : segs_) {
    if (s.end <= start || s.start >= end) { keep.push_back(s); continue; }
    if (s.start < start) keep.push_back({s.start, start, s.block, s.firstPage});
    uint64_t a = std::max(s.start, start), z = std::min(s.end, end);
    cut->push_back({a, z, s.block, s.firstPage + static_cast<uint32_t>((a - s.start) / kPage)});
    if (s.end > end) {
      keep.push_back({end, s.end, s.block, s.firstPage + static_cast<uint32_t>((end - s.start) / kPage)});
    }
  }
  segs_.swap(keep);
}

static void SortSegs(std::vector<Segment>* v) {
  std::sort(v->begin(), v->end(), [](const Segment& a, const Segment& b) { return a.start < b.start; });
}

// MADV_DONTNEED/REMOVE (the event arrives before the zap) or munmap (after):
// pages not yet saved lose their snapshot content. Zero-pending pages keep
// theirs: they were zero at the snapshot point, whatever happens now.
void Session::OnRemove(uint64_t start, uint64_t end, bool unmapped) {
  epoch_++;
  NoteLayout(start, end);  // chains: re-read there at the next generation
  touched_.push_back({start, end});
  std::vector<Segment> cut;
  CutSegments(start, end, &cut);
  for (const Segment& s : cut) {
    DiscardPages(s.block, s.firstPage, s.firstPage + static_cast<uint32_t>((s.end - s.start) / kPage));
    if (!unmapped) segs_.push_back(s);
  }
  if (!unmapped) SortSegs(&segs_);
}

// mremap moved pages (with their write-protection): follow them.
void Session::OnRemap(uint64_t from, uint64_t to, uint64_t len) {
  epoch_++;
  touched_.push_back({from, from + len});
  touched_.push_back({to, to + len});
  remapTo_.push_back({to, to + len});
  NoteLayout(from, from + len);  // chains: re-read there at the next generation
  NoteLayout(to, to + len);
  std::vector<Segment> replaced, moved;
  CutSegments(to, to + len, &replaced);
  for (const Segment& s : replaced) {
    DiscardPages(s.block, s.firstPage, s.firstPage + static_cast<uint32_t>((s.end - s.start) / kPage));
  }
  CutSegments(from, from + len, &moved);
  for (Segment s : moved) {
    s.start = s.start - from + to;
    s.end = s.end - from + to;
    segs_.push_back(s);
  }
  SortSegs(&segs_);
}

void Session::DiscardPages(int b, uint32_t p0, uint32_t p1) {
  Block& blk = blocks[b];
  std::vector<uint32_t> lost;
  for (uint32_t p = blk.done.NextClear(p0, p1); p < p1; p = blk.done.NextClear(p + 1, p1)) {
    if (blk.zeroPending.Test(p)) continue;
    blk.done.Set(p);
    lost.push_back(p);
  }
  if (lost.empty()) return;
  counters.discarded += lost.size();
  std::lock_guard<std::mutex> lock(mu_);
  if (discards_.empty() || discards_.back().first != b) discards_.push_back({b, {}});
  auto& v = discards_.back().second;
  v.insert(v.end(), lost.begin(), lost.end());
}

const Segment* Session::FindSeg(uint64_t addr) const {
  auto it = std::upper_bound(segs_.begin(), segs_.end(), addr,
                             [](uint64_t a, const Segment& s) { return a < s.start; });
  if (it == segs_.begin()) return nullptr;
  --it;
  return addr < it->end ? &*it : nullptr;
}

const Segment* Session::SegForPage(int b, uint32_t p) const {
  for (const Segment& s : segs_) {
    if (s.block == b && p >= s.firstPage && p < s.firstPage + (s.end - s.start) / kPage) return &s;
  }
  return nullptr;
}

uint32_t Session::NextSegPage(int b, uint32_t p) const {
  uint32_t next = blocks[b].pages;
  for (const Segment& s : segs_) {
    if (s.block == b && s.firstPage > p) next = std::min(next, s.firstPage);
  }
  return next;
}

// Until none is queued: serving one reads the fd again (its read's Drain,
// Release's), and faults read there get no kick (we are the server) and leave
// the fd with nothing to wake the poll: they waited for its 100 ms timeout
// (fault waits of 100-109 ms in bench/redis-clients).
bool Session::HandleFaults(Failure* f) {
  faultMode_ = true;
  while (!faults_.empty() && !f->failed()) {
    std::vector<Fault> batch;
    batch.swap(faults_);
    for (const Fault& ft : batch) {
      if (!HandleFault(ft, f)) break;
    }
  }
  faultMode_ = false;
  return !f->failed();
}

// Save the unchanged 64 KiB around the fault (2 MiB when a huge page maps it,
// asked of the kernel per fault, so the huge page is un-protected whole and not
// split), then un-protect, which wakes it.
bool Session::HandleFault(const Fault& ft, Failure* f) {
  uint64_t e0 = epoch_;
  const Segment* s = FindSeg(ft.addr);
  if (!s) return ResolveStray(ft.addr, f);
  int b = s->block;
  int huge = HugeAt(pagemapFd_, ft.addr);
  uint64_t g = huge == 1 || (huge < 0 && blocks[b].thp) ? kHuge : pool.Pressed() ? kPage : kFaultGranule;
  uint32_t p0, p1;
  GranulePages(*s, ft.addr, g, &p0, &p1);
  if (!SavePages(b, p0, p1, f)) return false;
  if (g != kHuge && epoch_ == e0) WidenSaved(*s, ft.addr, &p0, &p1);  // s is still good
  if (opts_.chain && !syncFinish_) {  // chains: only the page written loses its protection (generations.cc)
    ChainUnprotect(ft.addr);
  } else if (!Unprotect(b, p0, p1, f)) {
    return false;
  }
  if (epoch_ != e0) Wake(ft.addr);  // the pages moved: wake the old address too
  float us = static_cast<float>((NowMs() - ft.since) * 1000);
  std::lock_guard<std::mutex> lock(mu_);
  if (waits_.size() < (4u << 20)) waits_.push_back(us);
  return true;
}

// The saved pages on either side of a fault's neighbourhood lose their
// protection with it, within its 2 MiB (no huge page is split; the ioctl stays
// short). After a finish's stop nearly all of memory is saved already (only
// what the last pass left is not), yet protected until the scan gets there,
// so a target writing at random faulted on saved pages first of all.
void Session::WidenSaved(const Segment& s, uint64_t addr, uint32_t* p0, uint32_t* p1) const {
  const Bitmap& done = blocks[s.block].done;
  uint32_t first, last;
  GranulePages(s, addr, kHuge, &first, &last);
  while (*p0 > first && done.Test(*p0 - 1)) --*p0;
  *p1 = done.NextClear(*p1, last);
}

// Pages [*p0, *p1) of segment s's block in the aligned `g` bytes around addr,
// clipped to the segment.
void Session::GranulePages(const Segment& s, uint64_t addr, uint64_t g, uint32_t* p0, uint32_t* p1) {
  uint64_t lo = std::max(s.start, addr & ~(g - 1));
  uint64_t hi = std::min(s.end, (addr & ~(g - 1)) + g);
  *p0 = s.firstPage + static_cast<uint32_t>((lo - s.start) / kPage);
  *p1 = s.firstPage + static_cast<uint32_t>((hi - s.start) / kPage);
}

// Where a read starting at unsaved page p ends: before the next page not to be
// read (never-touched pages are recorded, not read: reading one would allocate
// it) and, for a fault, before the next page already saved. The scan reads on
// through short stretches of saved pages (Commit skips them): faults that save
// one page each leave them scattered, and a read per gap cost more than the
// copy of the gap (3 busy random writers: saver CPU 1.3 s for 2 GiB). Pages the
// target freed are never read through: a madvise or munmap waits until we read
// its event, which cuts the segments there first, and ReadRun stops at a
// segment's end. Not in chains, whose done pages are another generation's
// (generations.cc).
uint32_t Session::RunEnd(const Block& blk, uint32_t p, uint32_t p1) const {
  static constexpr uint32_t kBridge = 16;  // pages: a 64 KiB copy against a read's own costs
  // No read is longer than a batch (4 MiB at most). Looking further for the
  // next never-touched page, once per run of a few pages over a whole mapping,
  // was 14% of the saver's time in a pre-copy snapshot's stop.
  p1 = std::min(p1, p + 1024);
  uint32_t z = blk.zeroPending.NextSet(p, p1);
  uint32_t e = blk.done.NextSet(p, z);
  while (!faultMode_ && !opts_.chain && e < z) {
    uint32_t c = blk.done.NextClear(e, z);  // end of this stretch of saved pages
    if (c >= z || c - e > kBridge) break;
    e = blk.done.NextSet(c, z);
  }
  return e;
}

bool Session::SavePages(int b, uint32_t p0, uint32_t p1, Failure* f) {
  Block& blk = blocks[b];
  for (uint32_t p = blk.done.NextClear(p0, p1); p < p1; p = blk.done.NextClear(p, p1)) {
    if (abort_) return f->Set(ECANCELED, "capture aborted");
    if (blk.zeroPending.Test(p)) {
      Batch* bt = faultMode_ ? OpenBatch(b, f) : ScanBatch(b, f);
      if (!bt) return false;
      if (blk.done.Test(p)) continue;  // a fault settled it while the scan waited for a batch
      bt->index[bt->count] = p;
      bt->zero[bt->count++] = 1;
      blk.done.Set(p);
      counters.zeroPages++;
      counters.untouchedPages++;
      continue;
    }
    // The scan: scattered pages (a pass's, a finish's), gathered.
    int r = !faultMode_ && blk.kind == BlockKind::kProtected ? ReadGathered(b, p, p1, f) : 0;
    if (r == 0 && blk.done.Test(p)) continue;  // a fault saved it while the scan let go of the lock
    if (r == 0) r = ReadRun(b, p, RunEnd(blk, p, p1) - p, f);
    if (r < 0 && f->failed()) return false;
  }
  return true;
}

// One open batch per block (at most four at once), so faults landing in
// different mappings do not force out half-empty batches.
Batch* Session::OpenBatch(int b, Failure* f) {
  for (size_t i = 0; i < open_.size(); i++) {
    Batch* bt = open_[i];
    if (bt->block != b) continue;
    if (bt->count < bt->capIndex && bt->dataPages < bt->capData) return bt;
    open_.erase(open_.begin() + i);
    pool.Publish(bt);
    counters.batches++;
    notify_();
    break;
  }
  // Only the saver takes free batches, so none free now means Acquire would
  // wait: if the saver itself holds them open (a pool of 2-4 batches, faults in
  // several mappings), nothing would ever be released. Publish one first.
  if (open_.size() >= 4 || (!open_.empty() && pool.FreeCount() == 0)) {
    auto fullest = std::max_element(open_.begin(), open_.end(), [](Batch* x, Batch* y) {
      return x->dataPages + x->count < y->dataPages + y->count;
    });
    pool.Publish(*fullest);
    counters.batches++;
    open_.erase(fullest);
    notify_();
  }
  // No free batch: Acquire waits for the output (ready, open and the scan's
  // own batch hold them all; counting only ready and open missed the scan's).
  if (pool.FreeCount() == 0) counters.bufferWaits++;
  // Wait without saveMu_: the scan must not stop reading events (a storm
  // thread waits in the kernel for each) while the disk takes its time.
  saveMu_.unlock();
  Batch* bt = pool.Acquire(abort_, waitingSince_);
  saveMu_.lock();
  if (!bt) return f->Set(ECANCELED, "capture aborted"), nullptr;
  bt->block = b;
  open_.push_back(bt);
  return bt;
}

// The scan's batch too: called by the scan, or once the fault server is gone.
void Session::PublishAll() {
  if (scanBatch_) open_.push_back(scanBatch_);
  scanBatch_ = nullptr;
  for (Batch* bt : open_) {
    if (bt->count) counters.batches++;
    pool.Publish(bt);
  }
  open_.clear();
  notify_();
}

int Session::WpIoctl(uint64_t start, uint64_t len, bool protect) {
  uffdio_writeprotect wp{{start, len}, protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
  return ioctl(uffd_.load(), UFFDIO_WRITEPROTECT, &wp) == 0 ? 0 : errno;
}

void Session::Wake(uint64_t addr) {
  uffdio_range r{addr & ~(kPage - 1), kPage};
  ioctl(uffd_.load(), UFFDIO_WAKE, &r);
}

bool Session::ScanChunk(size_t* cb, uint32_t* cp, Failure* f) {
  Block& blk = blocks[*cb];
  if (*cp >= blk.pages || blk.dead) {  // dead: a chain's block gone from the layout
    (*cb)++;
    *cp = 0;
    return true;
  }
  uint32_t p0 = *cp, p1 = std::min(blk.pages, p0 + 1024);
  const Segment* s = blk.kind == BlockKind::kProtected ? SegForPage(static_cast<int>(*cb), p0) : nullptr;
  if (s) {  // up to the next 2 MiB boundary: queued faults wait for one chunk at most
    uint64_t addr = s->start + uint64_t(p0 - s->firstPage) * kPage;
    uint64_t chunkEnd = std::min(s->end, (addr & ~(kHuge - 1)) + kHuge);
    // Inside a stop no writer faults: pages scattered over the whole mapping
    // are gathered into few reads (ReadGathered). By 2 MiB, Redis's 375 pages
    // cost its finish's stop 7.7 ms.
    if (SavingInStop()) chunkEnd = s->end;
    p1 = p0 + static_cast<uint32_t>((chunkEnd - addr) / kPage);
  } else if (blk.kind == BlockKind::kProtected) {
    p1 = NextSegPage(static_cast<int>(*cb), p0);  // unmapped stretch
  }
  int b = static_cast<int>(*cb);
  // Chains: saved pages keep their protection, so a later write shows as dirty.
  // A pre-copy's finish is the chain's last generation: it lets go as it goes,
  // but not in its stop, where the rest of a chunk is only hidden as done.
  bool letGo = (!opts_.chain || syncFinish_) && !stopSaving_;
  if (!SavePages(b, p0, p1, f) || (letGo && !Unprotect(b, p0, p1, f))) return false;
  scannedBytes_ += uint64_t(p1 - p0) * kPage;
  *cp = p1;
  return true;
}

// --rate-limit paces the scan only; the fault server serves faults meanwhile.
bool Session::Pace(Failure* f) {
  // Never inside a stop (pre-copy's saves there): it would only lengthen the pause.
  if (opts_.rateLimitMBps <= 0 || SavingInStop()) return true;
  double due = paceStart_ + scannedBytes_ / (opts_.rateLimitMBps * 1e6) * 1e3;
  for (double now = NowMs(); now < due && !abort_; now = NowMs()) {
    heartbeat_ = now;
    usleep(static_cast<useconds_t>(std::min(due - now, 50.0) * 1000) + 100);
  }
  return !f->failed();
}

}  // namespace bgsnap
