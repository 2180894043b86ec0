// Reading pages into batches, for the scan and the fault server alike: one
// process_vm_readv run (in cache-sized pieces, each checksummed while still in
// this core's cache), the checks that its pages are still the snapshot's, and
// the commit into the open batch. Split from saver.cc, which drives it.
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "crc32.h"
#include "session.h"

namespace bgsnap {

static bool IsZeroPage(const uint8_t* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < kPage / 8; i += 4) {
    if (w[i] | w[i + 1] | w[i + 2] | w[i + 3]) return false;
  }
  return true;
}

// The CRC-32 of each of n pages just read (0 for a zero page, which carries no
// data), while they are still in this core's cache: at ~30 GB/s here, against
// ~8 GB/s when the JavaScript thread read them again later from memory.
static uint32_t SumPages(const uint8_t* pages, uint32_t n, uint32_t* crcs) {
  for (uint32_t i = 0; i < n; i++) {
    const uint8_t* page = pages + uint64_t(i) * kPage;
    crcs[i] = IsZeroPage(page) ? 0 : Crc32(0, page, kPage);
  }
  return n;
}

// process_vm_readv of n pages at addr into dst, in pieces of up to 256 KiB,
// each checksummed right after its read: the kernel's copy leaves a piece that
// size in this core's cache, but not a whole 1 MiB batch (measured here with
// destinations rotating over a 64 MiB pool: read+CRC took 1.48x the read alone
// with 1 MiB reads, 1.2x with 256 KiB pieces). Returns like one call: the bytes
// read until a piece came up short, or -1 with *err if none.
ssize_t Session::ReadSummed(uint64_t addr, uint8_t* dst, uint32_t n, uint32_t* crcs, uint32_t* summed, int* err) {
  static constexpr uint32_t kPiece = 64;  // pages
  ssize_t total = 0;
  for (uint32_t done = 0; done < n;) {
    uint32_t k = std::min(kPiece, n - done);
    iovec local{dst + uint64_t(done) * kPage, k * kPage};
    iovec remote{reinterpret_cast<void*>(addr + uint64_t(done) * kPage), k * kPage};
    ssize_t r = process_vm_readv(pid_, &local, 1, &remote, 1, 0);
    if (r < 0 && total == 0) return *err = errno, -1;
    if (r <= 0) break;
    uint32_t got = static_cast<uint32_t>(r / kPage);
    *summed += SumPages(dst + uint64_t(done) * kPage, got, crcs + done);
    total += r;
    done += got;
    if (got < k) break;
  }
  return total;
}

// Read up to n pages starting at page p of block b into the open batch.
// Returns pages settled, or -1 to retry (layout changed) / on failure.
// The scan reads without saveMu_, so faults are served meanwhile; pages a fault
// saves during that read are skipped at Commit (theirs is the snapshot's copy).
int Session::ReadRun(int b, uint32_t p, uint32_t n, Failure* f) {
  Block& blk = blocks[b];
  const bool scan = !faultMode_;  // this thread is the scan, not the fault server
  Batch* bt = scan ? ScanBatch(b, f) : OpenBatch(b, f);
  if (!bt) return -1;
  n = std::min({n, bt->capData - bt->dataPages, bt->capIndex - bt->count});
  uint8_t* dst = bt->data + uint64_t(bt->dataPages) * kPage;
  if (blk.kind == BlockKind::kCopied) {
    memcpy(dst, blk.copy.data() + uint64_t(p) * kPage, n * kPage);
    Commit(bt, b, p, n, SumPages(dst, n, bt->crcs + bt->dataPages));
    return static_cast<int>(n);
  }
  const Segment* s = SegForPage(b, p);
  if (!s) {  // unmapped and already cut out: nothing left to read
    DiscardPages(b, p, p + n);
    return static_cast<int>(n);
  }
  n = std::min<uint32_t>(n, s->firstPage + static_cast<uint32_t>((s->end - s->start) / kPage) - p);
  uint64_t addr = s->start + uint64_t(p - s->firstPage) * kPage;
  size_t mark = touched_.size();
  if (scan) touched_.clear(), mark = 0;  // no other read is in flight now
  if (scan) saveMu_.unlock();
  // Checksummed before saveMu_ is taken again, so faults do not wait for it.
  int err = 0;
  uint32_t summed = 0;
  ssize_t r = ReadSummed(addr, dst, n, bt->crcs + bt->dataPages, &summed, &err);
  if (scan) saveMu_.lock();
  if (!Drain(f)) return -1;
  // Redo the read only if an event touched what was read (a munmap, mremap or
  // madvise there may have raced it): allocators' storms elsewhere must not
  // make every read start over.
  if (Touched(addr, addr + n * kPage, mark)) {
    counters.rollbacks++;
    return -1;
  }
  if (r < 0 && err == ESRCH) return f->Set(ESRCH, "the target exited during capture"), -1;
  uint32_t got = r > 0 ? static_cast<uint32_t>(r / kPage) : 0;
  if (got == 0 && ForceRead(addr, dst)) got = 1;
  if (got > 0) got = StillProtected(b, p, addr, got);
  if (got == 0) {  // unreadable even so, or written behind our back: its content is lost to us
    DiscardPages(b, p, p + 1);
    return 1;
  }
  Commit(bt, b, p, got, std::min(summed, got));
  return static_cast<int>(got);
}

// Append n just-read pages to the batch: zero pages become zero records and the
// data behind them is compacted, so the batch holds non-zero pages back to back.
// The first `summed` pages' CRCs are already in their slots (SumPages); they
// move down with their pages (to a slot never after the one read from).
// `from`: where in the batch the pages were read, if further on than its end
// (a gathered read's later runs); each page moves down from there.
void Session::Commit(Batch* bt, int b, uint32_t p, uint32_t n, uint32_t summed, const uint8_t* from, bool held) {
  Block& blk = blocks[b];
  const uint8_t* src = from ? from : bt->data + uint64_t(bt->dataPages) * kPage;
  uint32_t w = bt->dataPages, zeros = 0, mine = 0;
  for (uint32_t i = 0; i < n; i++) {
    const uint8_t* page = src + uint64_t(i) * kPage;
    if (!held && blk.done.Test(p + i)) continue;  // a fault saved it while the scan read it
    mine++;
    bt->index[bt->count] = p + i;
    bool zero = IsZeroPage(page);
    bt->zero[bt->count++] = zero;
    if (!held) blk.done.Set(p + i);
    if (zero) { zeros++; continue; }
    bt->crcs[w] = i < summed ? bt->crcs[bt->dataPages + i] : Crc32(0, page, kPage);
    uint8_t* to = bt->data + uint64_t(w) * kPage;
    if (to != page) memmove(to, page, kPage);
    w++;
  }
  if (held) return void(bt->dataPages = w);  // counted when published (PublishHeld)
  counters.bytes += uint64_t(w - bt->dataPages) * kPage;
  counters.zeroPages += zeros;
  bt->dataPages = w;
  if (blk.kind == BlockKind::kProtected) (faultMode_ ? counters.faultPages : counters.scanPages) += mine;
}

// Scattered pages, gathered. What a pass or a finish saves is what was written
// since the last look: a few pages here and a few there (Redis: ~3 a run), and
// a process_vm_readv and a look at the userfaultfd per run cost a pass ~8 us a
// page (~5 gathered). Up to kRuns runs of the chunk go in one call, into the
// scan's batch back to back. Inside a stop nothing can fault or change the
// layout; outside one the read goes without saveMu_, as ReadRun's does, and a
// run a layout event touched meanwhile is left for the next look (as in
// ReadRun, Commit's skip of pages an event discarded already covers that).
// Returns the pages saved; 0 to take the ordinary path (one run, a short
// read, a page that lost its protection first).
struct Gather {
  static constexpr uint32_t kRuns = 256;
  iovec remote[kRuns];
  uint32_t at[kRuns], len[kRuns], n = 0, pages = 0;
};

int Session::ReadGathered(int b, uint32_t p, uint32_t p1, Failure* f) {
  if (!SegForPage(b, p)) return 0;
  Batch* bt = ScanBatch(b, f);
  if (!bt) return -1;
  Gather g;
  if (!PlanGather(b, p, p1, bt, &g)) return 0;  // one run: the ordinary read is as good
  const bool stopped = SavingInStop();
  iovec local{bt->data + uint64_t(bt->dataPages) * kPage, g.pages * kPage};
  touched_.clear();  // no other read of the scan's is in flight
  if (!stopped) saveMu_.unlock();
  ssize_t r = process_vm_readv(pid_, &local, 1, g.remote, g.n, 0);
  if (!stopped) saveMu_.lock();
  if (!stopped && !Drain(f)) return -1;
  if (r != static_cast<ssize_t>(g.pages) * static_cast<ssize_t>(kPage)) return 0;
  return CommitGathered(bt, b, g, stopped);
}

// The runs of not yet saved pages from p, within p's segment (ScanBatch may
// have let go of saveMu_: the layout is looked up again) and the batch's room.
bool Session::PlanGather(int b, uint32_t p, uint32_t p1, const Batch* bt, Gather* g) const {
  const Block& blk = blocks[b];
  const Segment* s = SegForPage(b, p);
  if (!s) return false;
  uint32_t lim = std::min(p1, s->firstPage + static_cast<uint32_t>((s->end - s->start) / kPage));
  uint32_t room = std::min(bt->capData - bt->dataPages, bt->capIndex - bt->count);
  for (uint32_t q = blk.done.NextClear(p, lim); q < lim && g->pages < room && g->n < Gather::kRuns;) {
    if (blk.zeroPending.Test(q)) break;  // recorded, never read: the ordinary path
    uint32_t e = std::min(RunEnd(blk, q, lim), q + room - g->pages);
    g->remote[g->n] = {reinterpret_cast<void*>(s->start + uint64_t(q - s->firstPage) * kPage), (e - q) * kPage};
    g->at[g->n] = q, g->len[g->n++] = e - q;
    g->pages += e - q;
    q = blk.done.NextClear(e, lim);
  }
  return g->n >= 2;
}

// Commits the runs read, each moving down over the zero pages compacted away
// and the runs skipped before it (Commit's `from`). Outside a stop, a run an event touched is skipped; each run is
// checked as ReadRun's is (StillProtected): a page that lost its protection
// ends the gather, for the ordinary path.
int Session::CommitGathered(Batch* bt, int b, const Gather& g, bool stopped) {
  uint8_t* src = bt->data + uint64_t(bt->dataPages) * kPage;
  int saved = 0;
  for (uint32_t i = 0; i < g.n; src += uint64_t(g.len[i++]) * kPage) {
    uint64_t addr = reinterpret_cast<uint64_t>(g.remote[i].iov_base);
    if (!stopped && Touched(addr, addr + uint64_t(g.len[i]) * kPage, 0)) {
      counters.rollbacks++;
      continue;
    }
    uint32_t ok = StillProtected(b, g.at[i], addr, g.len[i]);
    Commit(bt, b, g.at[i], ok, 0, src);
    saved += static_cast<int>(ok);
    if (ok < g.len[i]) break;
  }
  return saved;
}

}  // namespace bgsnap
