// Pre-copy's finish, between its move stops (precopy.cc, StagedMove): reading
// ahead what the snapshot will need while the target runs.
//
// A moved piece's pages written since the last pass (preDirty_, found by its
// move stop) are write-protected on the synchronous userfaultfd from that stop
// on. Until the target writes one again, it holds exactly what the snapshot
// will see; a write first faults and is un-protected (ServeBetween), so the
// snapshot's stop finds it written and it is saved again in the snapshot's
// generation, after this copy (the later record wins). Faults are served by
// this thread between reads, so no write can land between a read's start
// and its end unnoticed.
//
// Without this, those pages (Redis under SET load: 8-16k after the last pass)
// were protected until the scan after the snapshot's stop reached them, and
// the target's writes there waited for a fault round trip each (~1700 faults
// after the stop; 245-277 with these reads, bench/RESULTS.md). The
// copies go into batches held back from JavaScript until the snapshot's
// generation begins (PublishHeld): a batch belongs to one generation.
//
//   move stop | target runs as long as the stop | SideRead | next move stop ...
//   snapshot's stop: gen_++, PublishHeld (dead blocks' batches dropped), save
#include <sys/uio.h>

#include <algorithm>

#include "session.h"

namespace bgsnap {

static constexpr uint32_t kReadPages = 64;  // one read, ~256 KiB: a writer faulting meanwhile waits for it at most

// At most half the pool is held: the snapshot's stop saves into the rest
// (StopSaveLimit keeps what it saves within half). Every batch is free here
// (WaitOutput), so Acquire never waits.
Batch* Session::HeldBatch(int b, uint32_t need) {
  if (!held_.empty()) {
    Batch* bt = held_.back();
    if (bt->block == b && bt->capData - bt->dataPages >= need && bt->capIndex - bt->count >= need) return bt;
  }
  if (held_.size() >= pool.batches.size() / 2 || pool.FreeCount() == 0) return nullptr;
  Batch* bt = pool.Acquire(abort_, waitingSince_);
  if (!bt) return nullptr;
  bt->block = b;
  held_.push_back(bt);
  return bt;
}

// The runs preDirty_[from..] (what the last move stop found written in its
// pieces), read in gathered calls of up to kReadPages within one block, with
// faults served after each. What was read leaves preDirty_ (the snapshot's
// stop no longer marks it dirty: saved, unless written again); what was not
// (no batch left, a short read) stays, in order (MarkDirty searches it).
bool Session::SideRead(size_t from, Failure* f) {
  std::vector<Range> runs(preDirty_.begin() + static_cast<std::ptrdiff_t>(from), preDirty_.end());
  preDirty_.resize(from);
  std::vector<int> at = SideReadBlocks(runs);
  std::vector<Range> part;
  int partBlock = -1;
  uint32_t partPages = 0;
  bool more = true;  // false once the pool's half is used up: the rest is left to the snapshot
  auto flush = [&]() {
    if (more && !part.empty()) more = ReadHeld(partBlock, part, partPages, &preDirty_);
    else preDirty_.insert(preDirty_.end(), part.begin(), part.end());
    part.clear();
    partPages = 0;
    return ServeBetween(f);
  };
  for (size_t i = 0; i < runs.size(); i++) {
    Range r = runs[i];
    if (at[i] < 0 || abort_) { preDirty_.push_back(r); continue; }
    while (r.first < r.second) {
      if ((at[i] != partBlock || partPages == kReadPages) && !flush()) return false;
      partBlock = at[i];
      uint64_t e = std::min(r.second, r.first + uint64_t(kReadPages - partPages) * kPage);
      part.push_back({r.first, e});
      partPages += static_cast<uint32_t>((e - r.first) / kPage);
      r.first = e;
    }
  }
  return flush();
}

// Each run's block, or -1: none, or a block with fewer than kReadPages of
// them. A batch holds one block's pages, so a block with a few written pages
// (a program's .bss, its stack) would take a whole one: half a 4 MiB pool
// was gone after 3 pages (test/precopy). The snapshot's stop saves those.
std::vector<int> Session::SideReadBlocks(const std::vector<Range>& runs) const {
  std::vector<int> at(runs.size(), -1);
  std::vector<uint64_t> pages(blocks.size(), 0);
  const Block* blk = nullptr;
  for (size_t i = 0; i < runs.size(); i++) {
    const Range& r = runs[i];
    if (!blk || r.first < blk->start || r.second > blk->start + blk->length) blk = BlockAt(r.first, r.second);
    if (blk) at[i] = static_cast<int>(blk - blocks.data()), pages[at[i]] += (r.second - r.first) / kPage;
  }
  for (int& b : at) if (b >= 0 && pages[b] < kReadPages) b = -1;
  return at;
}

// The live protected block holding [s, e) whole, or null.
const Block* Session::BlockAt(uint64_t s, uint64_t e) const {
  for (const Block& b : blocks) {
    if (!b.dead && b.kind == BlockKind::kProtected && s >= b.start && e <= b.start + b.length) return &b;
  }
  return nullptr;
}

// One gathered read of `part` (pages of block b) into a held batch, each run
// committed as read (zero pages become zero records) without marking it done:
// done bits are the last pass's until the snapshot's stop. Runs not read whole
// go to `left`. False: no batch left.
bool Session::ReadHeld(int b, const std::vector<Range>& part, uint32_t pages, std::vector<Range>* left) {
  Batch* bt = HeldBatch(b, pages);
  if (!bt) return left->insert(left->end(), part.begin(), part.end()), false;
  iovec remote[kReadPages];
  for (size_t k = 0; k < part.size(); k++) remote[k] = {reinterpret_cast<void*>(part[k].first), part[k].second - part[k].first};
  uint8_t* src = bt->data + uint64_t(bt->dataPages) * kPage;
  iovec local{src, uint64_t(pages) * kPage};
  ssize_t r = process_vm_readv(pid_, &local, 1, remote, part.size(), 0);
  uint64_t got = r > 0 ? static_cast<uint64_t>(r) / kPage : 0;
  const Block& blk = blocks[b];
  for (const Range& x : part) {
    uint32_t len = static_cast<uint32_t>((x.second - x.first) / kPage), ok = static_cast<uint32_t>(std::min<uint64_t>(len, got));
    if (ok) Commit(bt, b, static_cast<uint32_t>((x.first - blk.start) / kPage), ok, 0, src, true);
    if (ok < len) left->push_back({x.first + uint64_t(ok) * kPage, x.second});
    freeze.heldPages += ok;
    got -= ok;
    src += uint64_t(len) * kPage;
  }
  return true;
}

// When the snapshot's generation begins (its number is out, before JavaScript
// is told): the held batches go out first. A block that died at the stop
// (unmapped, moved, re-protected: Relayout) is saved whole as a new one, so
// its batches are dropped; so are all of them when the stop failed.
void Session::PublishHeld(bool keep) {
  for (Batch* bt : held_) {
    const Block& blk = blocks[bt->block];
    if (keep && !blk.dead && blk.kind == BlockKind::kProtected && bt->count) {
      counters.bytes += uint64_t(bt->dataPages) * kPage;
      counters.zeroPages += bt->count - bt->dataPages;
      counters.scanPages += bt->count;
      counters.batches++;
    } else {
      bt->count = bt->dataPages = 0;
    }
    pool.Publish(bt);
  }
  held_.clear();
}

}  // namespace bgsnap
