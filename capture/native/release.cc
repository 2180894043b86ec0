// What the saver does about protection it did not drop itself, and dropping
// its own: faults outside every captured segment (W^X flips), pages KSM
// un-protected behind our back, pages only a debugger's read reaches
// (PROT_NONE), and un-protecting saved ranges under layout-event storms.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "session.h"

namespace bgsnap {

// Events drained since touched_[from] (a read's mark) that overlap [start, end).
bool Session::Touched(uint64_t start, uint64_t end, size_t from) const {
  for (size_t i = from; i < touched_.size(); i++) {
    if (touched_[i].first < end && start < touched_[i].second) return true;
  }
  return false;
}

// process_vm_readv honours the target's protection: a page made PROT_NONE after
// the snapshot (a JIT flipping W^X, a guard) fails it. /proc/PID/mem reads with
// FOLL_FORCE, as a debugger does, so the page is still saved.
bool Session::ForceRead(uint64_t addr, uint8_t* dst) {
  if (memFd_ < 0) {
    std::string path = "/proc/" + std::to_string(pid_) + "/mem";
    memFd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (memFd_ < 0) return false;
  }
  return pread(memFd_, dst, kPage, static_cast<off_t>(addr)) == static_cast<ssize_t>(kPage);
}

// KSM rebuilds the PTE of a page it merges without the write-protect bit
// (mm/ksm.c replace_page: mk_pte(kpage, vm_page_prot)), and it merges pages in
// write-protected ranges too: a later write then breaks the sharing by copy on
// write, without a fault we could hold it on. So after reading pages of
// anonymous private memory (the only kind KSM merges), ask the kernel whether
// they still carry the protection. One that lost it may have been written
// before we read it, even if it is a KSM page again now (a page rewritten with
// content already in KSM's stable tree is merged again at its next scan: seen
// in process-ksm), so it is counted and left out (discarded), never saved
// wrong. Returns how many leading pages are good; 0: the first one is lost.
// Pages a fault saved during the scan's read lost their protection to us, not
// to KSM: they are skipped at Commit, so they count as good here.
// Pre-copy: a pass reads pages the target may be writing (the kernel notes
// the write and the next generation reads the page again), and the snapshot
// reads while the target is stopped; unprotected pages are not lost ones.
// Nor are they in the finish's stop (SaveWrittenInStop): its pages are those
// written since memory moved, un-protected for their writers.
uint32_t Session::StillProtected(int b, uint32_t p, uint64_t addr, uint32_t n) {
  if (!blocks[b].anonPrivate || AsyncWp() || stopSaving_) return n;
  std::vector<uint64_t> pm(n);
  ssize_t want = static_cast<ssize_t>(n * sizeof(uint64_t));
  if (pread(pagemapFd_, pm.data(), want, static_cast<off_t>(addr / kPage * 8)) != want) return n;
  for (uint32_t i = 0; i < n; i++) {
    if (pm[i] & (1ull << 57) || blocks[b].done.Test(p + i)) continue;  // still write-protected, or ours
    if (i == 0) counters.lostProtection++;
    return i;
  }
  return n;
}

// A write fault in no captured segment: a mapping registered before the
// snapshot but not writable at it (a JIT flipping W^X, PROT_NONE and back:
// mprotect sends no event and keeps the PTEs' protection), or pages whose
// segment a layout event removed. None of it is ours to save, but a wake alone
// would let the writer fault on the same protected PTE forever: un-protect the
// page, which wakes it.
bool Session::ResolveStray(uint64_t addr, Failure* f) {
  counters.spurious++;
  if (!Release(addr & ~(kPage - 1), kPage, f)) return false;
  Wake(addr);
  return true;
}

// Un-protect pages [p0, p1) of block b wherever they live now; this also wakes
// writers waiting there. The ranges are computed again after any layout event
// (Release reads events, which may move or cut segments).
bool Session::Unprotect(int b, uint32_t p0, uint32_t p1, Failure* f) {
  if (blocks[b].kind != BlockKind::kProtected) return true;
  std::vector<Range> todo;
  for (const Segment& s : segs_) {
    uint32_t sp1 = s.firstPage + static_cast<uint32_t>((s.end - s.start) / kPage);
    uint32_t a = std::max(p0, s.firstPage), z = std::min(p1, sp1);
    if (s.block == b && a < z) todo.push_back({s.start + uint64_t(a - s.firstPage) * kPage, uint64_t(z - a) * kPage});
  }
  uint64_t e0 = epoch_;
  for (const Range& r : todo) {
    if (!Release(r.first, r.second, f)) return false;
    if (epoch_ != e0) return Unprotect(b, p0, p1, f);  // the layout changed: recompute
  }
  return true;
}

// Drop the protection of a range whose pages are all saved (or not ours).
// UFFDIO_WRITEPROTECT fails with EAGAIN while any layout event of the target is
// in flight (mmap_changing: from the munmap's or madvise's start until we read
// its event), and an allocator storming with MADV_DONTNEED/munmap has one in
// flight nearly all the time. Reading the event completes it, so the instant
// after a read is the likeliest one with none in flight: try again at once;
// with nothing to read, wait for the next event. After a few milliseconds,
// unregister the range instead: that has no such check, drops the protection
// and wakes its writers just the same, and nothing in a saved range needs
// events any more. Only the EAGAIN guarded against an mremap moving unsaved
// pages of ours onto the range before we read its event; pages that did are
// discarded (their protection is gone).
//
// Called with saveMu_ held, by the scan or the fault server; it never retries
// or waits holding it. Once, the scan retried here with the lock for good (its
// unregister budget spent: kept reading events, sleeping 5 ms between tries),
// so the fault server never got the lock, writers sat in their faults and the
// storm kept an event in flight at every try: the capture hung.
bool Session::Release(uint64_t start, uint64_t len, Failure* f) {
  double t0 = NowMs();
  for (;;) {
    int err = WpIoctl(start, len, false);
    if (err == 0 || err == ENOENT) return true;  // ENOENT: unmapped meanwhile; its event follows
    if (err != EAGAIN) return f->Set(err, "UFFDIO_WRITEPROTECT (un-protect) of " + Hex(start, len));
    counters.eagain++;
    uint64_t e0 = epoch_;
    if (!Drain(f)) return false;
    if (abort_) return f->Set(ECANCELED, "capture aborted");
    double waited = NowMs() - t0;
    if (waited > 2 && counters.unregistered < opts_.maxUnregisters) return Unregister(start, len, f);
    if (waited > opts_.retryOnlyMs) return GiveUp(start, len, f);
    LetGo(epoch_ == e0);  // nothing read: wait for the event; else retry at once
  }
}

// Let the other user of saveMu_ in (the PI mutex hands it to a waiter at
// unlock), optionally waiting up to 1 ms for the userfaultfd to have something
// to read: whoever holds the lock then reads it (the fault server polls too).
void Session::LetGo(bool wait) {
  saveMu_.unlock();
  if (wait) {
    pollfd p{uffd_.load(), POLLIN, 0};
    poll(&p, 1, 1);
  }
  saveMu_.lock();
}

// Each unregister inside a mapping may split it (vm.max_map_count is the
// target's budget too), so it is bounded (maxUnregisters); past it Release
// only retries, and a storm that never leaves a gap for retryOnlyMs (5 s) fails the
// capture with this error (the target is released as on any failure) instead
// of spinning forever.
bool Session::GiveUp(uint64_t start, uint64_t len, Failure* f) {
  return f->Set(EAGAIN, "UFFDIO_WRITEPROTECT (un-protect) of " + Hex(start, len) + " kept failing with EAGAIN for " +
                            std::to_string(opts_.retryOnlyMs) + " ms: the target's munmap/madvise/mremap events left no gap, and the " +
                            std::to_string(opts_.maxUnregisters) + " unregisters allowed are spent");
}

bool Session::Unregister(uint64_t start, uint64_t len, Failure* f) {
  uffdio_range r{start, len};
  remapTo_.clear();
  if (ioctl(uffd_.load(), UFFDIO_UNREGISTER, &r) != 0 && errno != EINVAL) {  // EINVAL: not ours now
    return f->Set(errno, "UFFDIO_UNREGISTER of " + Hex(start, len));
  }
  counters.unregistered++;
  if (!Drain(f)) return false;
  for (const Range& m : remapTo_) {
    std::vector<Segment> cut;
    uint64_t a = std::max(m.first, start), z = std::min(m.second, start + len);
    if (a >= z) continue;
    CutSegments(a, z, &cut);  // what moved here lost its protection with the range
    for (const Segment& c : cut) DiscardPages(c.block, c.firstPage, c.firstPage + static_cast<uint32_t>((c.end - c.start) / kPage));
  }
  return true;
}

std::string Session::Hex(uint64_t start, uint64_t len) {
  char buf[48];
  snprintf(buf, sizeof buf, "%llx-%llx", (unsigned long long)start, (unsigned long long)(start + len));
  return buf;
}

}  // namespace bgsnap
