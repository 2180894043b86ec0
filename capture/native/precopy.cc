// Pre-copy (`--precopy`): the target's writers never wait on us. The chain's
// userfaultfd is opened with UFFD_FEATURE_WP_ASYNC, so a write to a protected
// page is resolved by the kernel itself (~1.5 us, bench/tracking-cost.js)
// and only leaves the page marked written; nothing ever blocks on our threads.
// Generation 1 reads everything while the target runs, each later generation
// what was written since the previous one was protected again; these are
// passes (fuzzy: read at different moments). When what was written since the
// last pass is small (precopyFinalPages, or after precopyMaxPasses passes),
// the next generation is the snapshot: its dirty set is saved inside its
// stop, so generation K read back (each page's newest record) is the memory
// at that stop. This is live migration's pre-copy, applied to a process:
// against write-protect faults served by a thread (Redis under SET load:
// 10-26k faults of 7-200 us each during a capture), a writer pays a kernel
// fault per page per pass, and the one stop copies what the last pass left.
#include <algorithm>
#include <string>

#include "procfs.h"
#include "session.h"

namespace bgsnap {

// Between generations, while the target runs: how much the next stop would
// have to save, and so whether it is the snapshot or another pass. The stop
// saves into the buffers while JavaScript drains them; at most half of them
// (never waiting on the output while the target is stopped). A target that
// still writes more than that after the last pass is refused: its writes
// outrun the output, and a stop long enough to save them would be the harm
// pre-copy exists to avoid.
bool Session::LastPass(Failure* f) {
  freeze.pass = false;
  if (!opts_.precopy) return true;
  uint64_t pages = 0;
  Failure scan;  // an estimate: a range unmapped meanwhile only makes it rougher
  for (const Block& b : blocks) {
    if (b.dead || b.kind != BlockKind::kProtected) continue;
    ScanUnprotected(pagemapFd_, b.start, b.start + b.length, [&](uint64_t s, uint64_t e, uint64_t c) {
      if (c & (kPageIsPresent | kPageIsSwapped)) pages += (e - s) / kPage;
    }, &scan);
  }
  for (const Range& r : layoutSince_) pages += (r.second - r.first) / kPage;
  freeze.dirtyBefore = pages;
  uint64_t cap = uint64_t(opts_.bufferMb) * (1 << 20) / kPage / 2;
  if (pages <= std::min<uint64_t>(opts_.precopyFinalPages, cap)) return true;
  if (gen_.load() < static_cast<int>(opts_.precopyMaxPasses)) return freeze.pass = true;
  if (pages <= cap) return true;  // a longer stop, still within the buffers
  return f->Set(EAGAIN, "pre-copy did not converge: the target wrote " + std::to_string(pages) +
                            " pages since pass " + std::to_string(gen_.load()) + ", more than the " +
                            std::to_string(cap) + " a stop may save (half of --buffer-mb); its writes outrun "
                            "the output. The target was released unharmed; a capture without --precopy "
                            "saves it with write-protect faults instead");
}

// The snapshot generation's save, with the target stopped: JavaScript is told
// the generation began (it drains the buffers meanwhile), and the saver reads
// exactly the dirty set; nothing can write it before the thaw.
bool Session::SaveInFreeze(Failure* f) {
  threads = helper_.threads();  // the state JavaScript reads now is this stop's
  freeze.threads = static_cast<int>(threads.size());
  gen_++;
  frozen_ = true;
  savedInFreeze_ = true;
  notify_();
  double t0 = NowMs();
  bool ok = SaverLoop(f);
  freeze.copyMs += NowMs() - t0;
  return ok;
}

}  // namespace bgsnap
