// Copy, while the target is frozen, the mappings we could not protect.
//
// Some of that memory is served by the target itself: a range registered with
// its own userfaultfd (MISSING mode: the kernel refuses our registration with
// EBUSY, so we copy it) or a file on a FUSE filesystem it implements. Reading a
// page its server has not filled waits for that server, which is frozen: the
// read would wait forever, and the target with it. The wait is in the kernel's
// remote GUP, which only a fatal signal ends, so no signal can get us out.
// So the reads run on a worker thread under a deadline: past it the capture
// fails with ETIMEDOUT naming the range, the caller drops the protection and
// releases the target, its server fills the page, and the worker's read
// returns and the worker ends by itself (it owns everything it touches).
#include <sys/uio.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>

#include "session.h"

namespace bgsnap {

// Their total is capped too: they are held in memory until saved, and copying
// lengthens the pause. Beyond it the target is not a fit (e.g. it registered a
// large range with its own userfaultfd) and we say so rather than stall it.
static constexpr uint64_t kFrozenCopyCap = 64ull << 20;

namespace {

struct Piece {
  int block;
  uint64_t start;
  uint32_t pages;
  Bitmap zero;          // pages not to read (recorded as zero)
  bool shared = false;  // may be device memory: probed first
  bool device = false;  // its first page is unreadable (EFAULT): device memory
};

// Shared by the freeze and the worker; the last one to let go frees it.
struct CopyJob {
  pid_t pid = 0;
  std::vector<Piece> pieces;
  std::vector<std::vector<uint8_t>> bufs;     // one per piece
  std::vector<std::pair<int, uint32_t>> lost;  // (block, page) unreadable
  uint64_t copied = 0;
  int err = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::atomic<uint64_t> at{0};  // the address being read now
};

void CopyPiece(CopyJob* job, size_t i) {
  const Piece& pc = job->pieces[i];
  std::vector<uint8_t>& buf = job->bufs[i];
  buf.resize(uint64_t(pc.pages) * kPage);
  for (uint32_t p = 0; p < pc.pages && job->err == 0;) {
    if (pc.zero.Test(p)) { p++; continue; }
    uint32_t n = pc.zero.NextSet(p, std::min(pc.pages, p + 16384)) - p;
    iovec local{buf.data() + uint64_t(p) * kPage, n * kPage};
    iovec remote{reinterpret_cast<void*>(pc.start + uint64_t(p) * kPage), n * kPage};
    job->at = pc.start + uint64_t(p) * kPage;
    ssize_t r = process_vm_readv(job->pid, &local, 1, &remote, 1, 0);
    if (r < 0 && errno == ESRCH) job->err = ESRCH;
    uint32_t got = r > 0 ? static_cast<uint32_t>(r / kPage) : 0;
    job->copied += got;
    p += got;
    if (got < n) job->lost.push_back({pc.block, p++});  // unreadable (a device mapping)
  }
}

// Device memory (VM_IO / VM_PFNMAP: device registers, perf rings) refuses
// get_user_pages, so process_vm_readv reads nothing of it: it is not the
// process's memory, costs nothing to leave out, and must not count toward the
// cap. A shared mapping whose first page cannot be read is such memory. The
// probe is a read like any other (a self-served first page waits too), so it
// runs here, under the same deadline.
void Probe(CopyJob* job) {
  char page[kPage];
  for (Piece& pc : job->pieces) {
    if (!pc.shared) continue;
    iovec local{page, kPage}, remote{reinterpret_cast<void*>(pc.start), kPage};
    job->at = pc.start;
    pc.device = process_vm_readv(job->pid, &local, 1, &remote, 1, 0) < 0 && errno == EFAULT;
  }
}

void RunJob(std::shared_ptr<CopyJob> job, bool probe) {
  if (probe) Probe(job.get());
  for (size_t i = 0; !probe && i < job->pieces.size() && job->err == 0; i++) {
    if (!job->pieces[i].device) CopyPiece(job.get(), i);
  }
  std::lock_guard<std::mutex> lock(job->mu);
  job->done = true;
  job->cv.notify_all();
}

}  // namespace

// Run one phase of the job on a worker thread; false if it missed the deadline.
static bool RunBounded(const std::shared_ptr<CopyJob>& job, bool probe, double deadline) {
  job->done = false;
  std::thread(RunJob, job, probe).detach();
  std::unique_lock<std::mutex> lock(job->mu);
  auto left = std::chrono::duration<double, std::milli>(std::max(0.0, deadline - NowMs()));
  return job->cv.wait_for(lock, left, [&] { return job->done; });
}

bool Session::FrozenReadTimeout(const std::shared_ptr<void>& j, Failure* f) {
  auto job = std::static_pointer_cast<CopyJob>(j);
  char at[32];
  snprintf(at, sizeof at, "0x%llx", (unsigned long long)job->at.load());
  std::string name;
  for (const Piece& pc : job->pieces) {
    if (job->at >= pc.start && job->at < pc.start + uint64_t(pc.pages) * kPage) name = blocks[pc.block].name;
  }
  return f->Set(ETIMEDOUT, "reading " + std::string(at) + " in " + name + " while the target was frozen "
                "did not finish in " + std::to_string(opts_.frozenReadMs) + " ms: the target serves this "
                "memory itself (its own userfaultfd, or a FUSE file); capture refused, target released");
}

bool Session::CopyFrozen(Failure* f) {
  auto job = std::make_shared<CopyJob>();
  job->pid = pid_;
  bool shared = false;
  for (size_t bi = 0; bi < blocks.size(); bi++) {
    const Block& b = blocks[bi];
    if (b.kind != BlockKind::kCopied || b.dead) continue;
    job->pieces.push_back({static_cast<int>(bi), b.start, b.pages, b.zeroPending, maps[b.map].perms[3] == 's'});
    shared |= job->pieces.back().shared;
  }
  if (job->pieces.empty()) return true;
  double deadline = NowMs() + opts_.frozenReadMs;
  if (shared && !RunBounded(job, true, deadline)) return FrozenReadTimeout(job, f);
  uint64_t total = 0;
  for (const Piece& pc : job->pieces) {
    if (pc.device) {
      maps[blocks[pc.block].map].how = "discarded: device memory (VM_IO/VM_PFNMAP), unreadable";
      DiscardPages(pc.block, 0, pc.pages);
      continue;
    }
    for (uint32_t p = pc.zero.NextClear(0, pc.pages); p < pc.pages;) {
      uint32_t q = pc.zero.NextSet(p, pc.pages);
      total += uint64_t(q - p) * kPage;
      p = pc.zero.NextClear(q, pc.pages);
    }
  }
  if (total > kFrozenCopyCap) {
    return f->Set(EFBIG, "the target has " + std::to_string(total >> 20) + " MiB of writable "
                         "memory that cannot be write-protected (private file mappings, or "
                         "ranges registered with its own userfaultfd); copying more than " +
                         std::to_string(kFrozenCopyCap >> 20) + " MiB while frozen is refused");
  }
  job->bufs.resize(job->pieces.size());
  if (!RunBounded(job, false, deadline)) return FrozenReadTimeout(job, f);
  if (job->err == ESRCH) return f->Set(ESRCH, "the target exited while frozen");
  for (size_t i = 0; i < job->pieces.size(); i++) {
    if (!job->pieces[i].device) blocks[job->pieces[i].block].copy.swap(job->bufs[i]);
  }
  for (const auto& l : job->lost) DiscardPages(l.first, l.second, l.second + 1);
  counters.copiedPages += job->copied;
  return true;
}

}  // namespace bgsnap
