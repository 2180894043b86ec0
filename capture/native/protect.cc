// Write-protection in two steps, so the snapshot freeze stays short.
//
// Write-protecting 4 KiB pages costs ~30 ms per GiB of CPU in the kernel (every
// page table entry is rewritten), 15 ms per GiB on two cores: far more than the
// rest of the freeze. So the memory is protected while the target still runs
// (PreProtect); a writer that hits a protected page then is simply let go (its
// page un-protected, nothing saved: the snapshot point is still ahead). The
// snapshot freeze then asks the kernel which pages are not protected
// (PAGEMAP_SCAN's PAGE_IS_WRITTEN category, a fast walk: ~0.6 ms per GiB) and
// protects only those: the pages written or first touched since, and new
// mappings. The result is the same state a full protect in the freeze gives.
//
// We keep synchronous write-protect throughout: UFFD_FEATURE_WP_ASYNC (which
// PAGEMAP_SCAN could re-arm by itself) resolves faults without us, so it cannot
// hold a writer until its page is saved.
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <thread>

#include "procfs.h"
#include "session.h"

namespace bgsnap {

static constexpr uint64_t kPiece = 16ull << 20;  // unit of work for the protect threads
static constexpr uint64_t kMergeGap = 8 * kPage;  // re-protecting 8 pages costs about one ioctl

static unsigned Workers() {
  return std::max(2u, std::min(4u, std::thread::hardware_concurrency()));
}

// Register every mapping we capture that we can (the snapshot freeze registers again,
// idempotently, and copies the ones the kernel refuses).
std::vector<Session::Range> Session::RegisterAll() {
  std::vector<Range> out;
  int fd = uffd_.load();
  for (const MapEntry& m : maps) {
    std::string why;
    if (Skippable(m, &why)) continue;
    uffdio_register reg{{m.start, m.end - m.start}, UFFDIO_REGISTER_MODE_WP, 0};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) == 0) out.push_back({m.start, m.end});
  }
  return out;
}

// Protect while the target runs, then re-protect what it wrote meanwhile, up to
// twice, while that still shrinks the work left for the freeze.
bool Session::PreProtect(Failure* f) {
  double t0 = NowMs();
  std::vector<Range> all = RegisterAll(), again;
  bool ok = ProtectRanges(all, true, f);
  for (uint64_t pages = 0; ok && freeze.preRounds < 2; freeze.preRounds++) {
    ok = Unprotected(all, &again, &pages, f);
    if (!ok || pages < 256) break;
    ok = ProtectRanges(again, true, f);
  }
  freeze.preProtectMs = NowMs() - t0;
  if (ok) Hold("preprotect");
  if (ok && abort_) return f->Set(ECANCELED, "capture aborted");
  return ok;
}

// Runs of touched pages in `in` that are not write-protected, merged across
// small gaps. Never-touched pages are left out: anonymous ones need no
// protection, and the freeze deals with the rest.
bool Session::Unprotected(const std::vector<Range>& in, std::vector<Range>* out,
                          uint64_t* pages, Failure* f) {
  out->clear();
  *pages = 0;
  for (const Range& r : in) {
    size_t first = out->size();
    bool ok = ScanUnprotected(pagemapFd_, r.first, r.second, [&](uint64_t s, uint64_t e, uint64_t c) {
      if (!(c & (kPageIsPresent | kPageIsSwapped))) return;
      *pages += (e - s) / kPage;
      if (out->size() > first && s - out->back().second <= kMergeGap) out->back().second = e;
      else out->push_back({s, e});
    }, f);
    if (!ok) return false;
  }
  return true;
}

// One range, cut at 2 MiB boundaries so no huge page is split. EAGAIN means a
// mapping change is in flight: back off (its event is being served) and retry.
// Before the freeze (!strict) failures are left for the freeze to repair.
bool Session::ProtectPiece(const Range& r, bool strict, Failure* f) {
  for (useconds_t backoff = 50; !abort_; backoff = std::min<useconds_t>(backoff * 2, 5000)) {
    int err = WpIoctl(r.first, r.second - r.first, true);
    if (err == 0) return true;
    if (err != EAGAIN || backoff >= 5000) {
      return strict ? f->Set(err, "UFFDIO_WRITEPROTECT") : true;
    }
    usleep(backoff);
  }
  return f->Set(ECANCELED, "capture aborted");
}

// Protect `ranges` on Workers() threads. While the target runs (serve) this
// thread serves its faults meanwhile; frozen, it protects too.
bool Session::ProtectRanges(const std::vector<Range>& ranges, bool serve, Failure* f) {
  std::vector<Range> pieces;
  for (const Range& r : ranges) {
    for (uint64_t s = r.first; s < r.second;) {
      uint64_t e = std::min(r.second, ((s + kPiece) & ~(kHuge - 1)));
      pieces.push_back({s, e});
      s = e;
    }
  }
  std::atomic<size_t> next{0};
  std::atomic<unsigned> running{0};
  std::mutex mu;
  Failure first;
  auto work = [&] {
    Failure mine;
    for (size_t i; (i = next++) < pieces.size() && !mine.failed();) ProtectPiece(pieces[i], !serve, &mine);
    if (mine.failed()) { std::lock_guard<std::mutex> l(mu); first.Set(mine.err, mine.what); }
    running--;
  };
  uint64_t pages = 0;
  for (const Range& r : pieces) pages += (r.second - r.first) / kPage;
  // Frozen, a thread costs more to start than a small job takes (~0.1 us per
  // page plus ~1.5 us per ioctl): then this thread does it alone.
  bool small = !serve && pages / 10 + pieces.size() * 3 / 2 < 300;
  unsigned n = small ? 0 : std::min<unsigned>(Workers() - (serve ? 0 : 1), static_cast<unsigned>(pieces.size()));
  std::vector<std::thread> helpers;
  running = n;
  for (unsigned i = 0; i < n; i++) helpers.emplace_back(work);
  while (serve && running > 0 && !f->failed()) {
    heartbeat_ = NowMs();
    pollfd p{uffd_.load(), POLLIN, 0};
    poll(&p, 1, preFaults_.empty() ? 2 : 1);
    ServePre(f);
  }
  if (!serve) { running++; work(); }
  for (std::thread& t : helpers) t.join();
  if (first.failed()) f->Set(first.err, first.what);
  return !f->failed();
}

// Before the snapshot point: read events, and let faulting writers go at once.
// Layout events need nothing (reading them released the thread; the freeze
// reads the layout afresh).
bool Session::ServePre(Failure* f) {
  if (gen_ > 0) return ServeBetween(f);  // chains (generations.cc): layout events are kept there
  bool ok = ReadEvents(f, [this](const uffd_msg& m) {
    if (m.event == UFFD_EVENT_PAGEFAULT) preFaults_.push_back(m.arg.pagefault.address);
  });
  if (!ok) return false;
  std::vector<uint64_t> todo;
  todo.swap(preFaults_);
  for (uint64_t a : todo) PreFault(a);
  return true;
}

// Un-protect just the page written (its whole huge page in THP areas: a partial
// un-protect would split it); the freeze protects it again. EAGAIN: retry later.
void Session::PreFault(uint64_t addr) {
  uint64_t g = HugeAt(pagemapFd_, addr) == 1 ? kHuge : kPage;
  int err = WpIoctl(addr & ~(g - 1), g, false);
  if (err == EAGAIN) { preFaults_.push_back(addr); return; }
  if (err) Wake(addr);  // unmapped meanwhile: let it fault again and see why
  freeze.preFaults++;
}

// What one scan thread found in its share of the protected blocks.
struct Session::ScanPart {
  std::vector<std::pair<int, Range>> spans;  // (block, range) to scan
  std::vector<std::pair<int, Range>> zero;   // never-touched anonymous pages
  std::vector<Range> todo;                   // to protect
  std::vector<int> thp;
  uint64_t pages = 0;
  Failure f;
};

// Cut the protected blocks into `n` shares of about equal size, at 2 MiB
// boundaries (scan cost is per page: ~0.8 ms per GiB, the bulk of the freeze).
std::vector<Session::ScanPart> Session::SplitScan(unsigned n) {
  uint64_t total = 0, acc = 0;
  for (const Block& b : blocks) if (b.kind == BlockKind::kProtected) total += b.length;
  std::vector<ScanPart> parts(n);
  for (size_t i = 0; i < blocks.size(); i++) {
    const Block& b = blocks[i];
    if (b.kind != BlockKind::kProtected) continue;
    for (uint64_t s = b.start, e = b.start + b.length; s < e;) {
      unsigned k = static_cast<unsigned>(std::min<uint64_t>(n - 1, acc * n / total));
      uint64_t left = total * (k + 1) / n - acc;  // bytes until share k is full
      uint64_t cut = std::min(e, (s + left + kHuge - 1) & ~(kHuge - 1));
      if (k == n - 1 || cut <= s) cut = e;
      parts[k].spans.push_back({static_cast<int>(i), {s, cut}});
      acc += cut - s;
      s = cut;
    }
  }
  return parts;
}

void Session::ScanShare(ScanPart* part) {
  for (const auto& sp : part->spans) {
    const Block& b = blocks[sp.first];
    size_t first = part->todo.size();
    bool ok = ScanUnprotected(pagemapFd_, sp.second.first, sp.second.second, [&](uint64_t s, uint64_t e, uint64_t c) {
      if (c & kPageIsHuge) part->thp.push_back(sp.first);
      if (!(c & (kPageIsPresent | kPageIsSwapped)) && b.anonPrivate) {
        part->zero.push_back({sp.first, {s, e}});
        return;
      }
      part->pages += (e - s) / kPage;
      if (part->todo.size() > first && s - part->todo.back().second <= kMergeGap) part->todo.back().second = e;
      else part->todo.push_back({s, e});
    }, &part->f);
    if (!ok) return;
  }
}

// In the freeze: protect every touched page the kernel reports unprotected.
// Never-touched anonymous pages are recorded as zero (not trapped, never read);
// empty entries of shared memory get the kernel's write-protect marker.
bool Session::ProtectUnprotected(Failure* f) {
  double t0 = NowMs();
  uint64_t total = 0;
  for (const Block& b : blocks) if (b.kind == BlockKind::kProtected) total += b.length;
  if (total == 0) return true;
  // Below ~512 MiB a thread costs more to start than it saves.
  std::vector<ScanPart> parts = SplitScan(total < (512ull << 20) ? 1 : Workers());
  std::vector<std::thread> helpers;
  for (size_t i = 1; i < parts.size(); i++) helpers.emplace_back(&Session::ScanShare, this, &parts[i]);
  ScanShare(&parts[0]);
  for (std::thread& t : helpers) t.join();
  std::vector<Range> todo;
  for (ScanPart& p : parts) {
    if (p.f.failed()) return f->Set(p.f.err, p.f.what);
    for (const auto& z : p.zero) {
      Block& b = blocks[z.first];
      b.zeroPending.SetRange((z.second.first - b.start) / kPage, (z.second.second - b.start) / kPage);
    }
    for (int bi : p.thp) blocks[bi].thp = true;
    todo.insert(todo.end(), p.todo.begin(), p.todo.end());
    freeze.reprotectPages += p.pages;
  }
  freeze.pagemapMs = NowMs() - t0;
  freeze.reprotectRanges = todo.size();
  return ProtectRanges(todo, false, f);
}

}  // namespace bgsnap
