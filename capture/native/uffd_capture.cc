// The freeze phase: everything that happens while the target's threads are
// stopped. Its duration is the target's pause, so it does only what must be
// atomic with the snapshot point: inject the userfaultfd, register and
// write-protect, find never-touched pages, copy what cannot be protected.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include "procfs.h"
#include "session.h"
#include "uffd_sysctl.h"

namespace bgsnap {

static constexpr uint64_t kWpFeatures = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
                                        UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
                                        UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
                                        UFFD_FEATURE_EVENT_UNMAP;
// Pre-copy's tracking: the kernel resolves write faults itself (Linux 6.7;
// the build machine's headers may predate it).
static constexpr uint64_t kWpAsync = 1ull << 15;  // UFFD_FEATURE_WP_ASYNC

// Ask the kernel what it supports using a userfaultfd of our own, before the
// target is touched, so an unsupported kernel fails with the target untouched.
bool Session::ProbeKernel(Failure* f) {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) {
    return f->Set(errno, "this kernel offers no userfaultfd to us (CONFIG_USERFAULTFD, or we "
                         "lack CAP_SYS_PTRACE)");
  }
  uffdio_api api{UFFD_API, 0, 0};
  int r = ioctl(fd, UFFDIO_API, &api);
  close(fd);
  if (r != 0) return f->Set(errno, "UFFDIO_API probe");
  if ((api.features & kWpFeatures) != kWpFeatures) {
    return f->Set(EOPNOTSUPP, "this kernel lacks userfaultfd write-protect support (needs "
                              "PAGEFAULT_FLAG_WP, WP_HUGETLBFS_SHMEM and REMAP/REMOVE/UNMAP "
                              "events, Linux 5.19+)");
  }
  if (opts_.precopy && !(api.features & kWpAsync)) {
    return f->Set(EOPNOTSUPP, "--precopy needs userfaultfd's WP_ASYNC (Linux 6.7+), which this kernel lacks");
  }
  return true;
}

bool Session::ReadProcState(Failure* f) {
  std::string base = "/proc/" + std::to_string(pid_) + "/";
  if (!ReadWhole(base + "maps", &mapsText) || !ParseMaps(mapsText, &maps)) {
    return f->Set(ESRCH, "reading " + base + "maps (kernel thread or exited?)");
  }
  if (!CheckDumpable(f)) return false;  // again while frozen: it may have changed since Setup
  ReadWhole(base + "auxv", &auxv);
  ReadWhole(base + "cmdline", &cmdline);
  ReadWhole(base + "status", &status);
  char buf[4096];
  ssize_t n = readlink((base + "exe").c_str(), buf, sizeof buf - 1);
  exe.assign(buf, n > 0 ? static_cast<size_t>(n) : 0);
  return true;
}

// The helper process plants the userfaultfd (freezer_main.cc: plain call, then
// /dev/userfaultfd, then the sysctl) and hands it to us; the target keeps no copy.
bool Session::InjectUffd(Failure* f) {
  const MapEntry* vdso = nullptr;
  for (const MapEntry& m : maps) if (m.path == "[vdso]") vdso = &m;
  if (!vdso) return f->Set(ENOEXEC, "the target has no vDSO to borrow a syscall instruction from");
  InjectRequest r;
  r.vdsoStart = vdso->start;
  r.vdsoEnd = vdso->end;
  r.holdPoint = opts_.holdAt == "injecting" ? kHoldInjecting
              : opts_.holdAt == "sysctl"    ? kHoldSysctl : kHoldNone;
  r.holdMs = opts_.holdMs;
  r.stepTimeoutMs = opts_.stepTimeoutMs;
  r.testStuck = opts_.testStuckInjection;
  r.suspendSeccomp = opts_.suspendSeccomp;
  int fd = -1, via = 0;
  if (!PlantUffd(r, &fd, &via, &freeze.seccompSuspended, f)) return false;
  uffd_ = fd;
  freeze.uffdVia = via;
  freeze.sysctlToggled = via == kViaSysctl;
  uffdio_api api{UFFD_API, kWpFeatures | (opts_.precopy ? kWpAsync : 0), 0};
  if (ioctl(fd, UFFDIO_API, &api) != 0) return f->Set(errno, "UFFDIO_API on the target's mm");
  return !opts_.precopy || InjectSyncUffd(r, f);
}

bool Session::PlantUffd(const InjectRequest& r, int* fd, int* via, bool* suspended, Failure* f) {
  int before = geteuid() == 0 ? ReadUffdSysctl() : -1;
  bool ok = helper_.InjectUffd(r, fd, via, suspended, f);
  // The helper puts the sysctl back itself; if it died with it open, we do.
  if (!ok && helper_.lost() && before == 0 && ReadUffdSysctl() != 0) WriteUffdSysctl(0);
  return ok;
}

// Pre-copy's second userfaultfd, planted in the same stop: synchronous, with no
// range registered until a finish that needs it (precopy.cc, SwitchToSync).
// A userfaultfd's mode is fixed when it is opened, and only the target itself
// can open one on its memory.
bool Session::InjectSyncUffd(InjectRequest r, Failure* f) {
  r.holdPoint = kHoldNone;  // the tests' holds are the first injection's
  r.testStuck = false;
  int fd = -1, via = 0;
  bool suspended = false;
  if (!PlantUffd(r, &fd, &via, &suspended, f)) return false;
  {
    std::lock_guard<std::mutex> lock(fdMu_);
    syncUffd_ = fd;
  }
  uffdio_api api{UFFD_API, kWpFeatures, 0};
  if (ioctl(fd, UFFDIO_API, &api) != 0) return f->Set(errno, "UFFDIO_API on the target's second userfaultfd");
  return true;
}

// Anonymous memory: no file behind it ([heap], [stack], a named [anon:...] or
// none), or /dev/zero (private: the kernel makes it anonymous). The kernel's
// vdso, vvar and vsyscall are not.
static bool Anonymous(const MapEntry& m) {
  return (m.inode == 0 && (m.path.empty() || m.path == "[heap]" || m.path == "[stack]" ||
                           m.path.rfind("[anon:", 0) == 0)) ||
         m.path == "/dev/zero";
}

// What a kernel core holds with the default coredump_filter (0x33), less the
// unmodified file pages that NT_FILE names: writable mappings, and private
// anonymous ones whatever their protection (JIT code after its W^X flip, data
// made read-only). Those are registered and write-protected like the others,
// so a later mprotect-and-write still saves the old bytes first. Unreadable
// (PROT_NONE) ones hold nothing to read; MADV_DONTDUMP ranges are left out as
// the kernel leaves them out.
bool Session::Skippable(const MapEntry& m, std::string* why) const {
  bool readable = m.perms.size() >= 4 && m.perms[0] == 'r';
  bool wanted = readable && (m.perms[1] == 'w' || (m.perms[3] == 'p' && Anonymous(m)));
  if (!wanted) *why = readable ? "not writable" : "not readable";
  else if (m.path == "[vsyscall]" || m.path == "[vvar]" || m.path == "[vvar_vclock]")
    *why = "kernel mapping";
  else if (DontDump(m)) *why = "MADV_DONTDUMP";
  else return false;
  return true;
}

// Untouched pages of these read as zero. A private mapping of /dev/zero is
// anonymous memory (the kernel drops its file ops) though maps names the file.
static bool AnonPrivate(const MapEntry& m) {
  return m.perms[3] == 'p' && (m.path.empty() || m.path[0] == '[' || m.path == "/dev/zero");
}

// VmFlags "dd": MADV_DONTDUMP. /proc/PID/smaps counts every page's residency
// to print it, so it is read before the freeze (Setup) and inside it only when
// the layout changed since (RecheckSmaps). Sorted by address, like maps.
bool Session::ReadSmaps(bool frozen, Failure* f) {
  if (opts_.includeDontDump) return true;
  double t0 = NowMs();
  std::string text, path = "/proc/" + std::to_string(pid_) + "/smaps";
  if (!ReadWhole(path, &text) || !ParseSmaps(text, &smaps_)) {
    return f->Set(ESRCH, "reading " + path + " (kernel thread or exited?)");
  }
  (frozen ? freeze.smapsFrozenMs : freeze.smapsMs) += NowMs() - t0;
  return true;
}

// In the snapshot freeze: the smaps read before it describes the snapshot when
// every mapping is still there with the same bounds. Left undetected: a
// madvise(MADV_[DONT]DUMP) of a whole mapping in the milliseconds between.
bool Session::RecheckSmaps(Failure* f) {
  if (opts_.includeDontDump) return true;
  bool same = smaps_.size() == maps.size() &&
              std::equal(maps.begin(), maps.end(), smaps_.begin(), [](const MapEntry& m, const VmaFlags& v) {
                return m.start == v.start && m.end == v.end;
              });
  if (same) return true;
  freeze.smapsReread = true;
  return ReadSmaps(true, f);
}

bool Session::DontDump(const MapEntry& m) const {
  auto it = std::lower_bound(smaps_.begin(), smaps_.end(), m.start,
                             [](const VmaFlags& v, uint64_t a) { return v.start < a; });
  return it != smaps_.end() && it->start == m.start && it->end == m.end && it->dontDump;
}

// Register every mapping we capture for write-protect. The kernel refuses private
// file mappings (EINVAL) and ranges the target registered itself (EBUSY): those
// are copied while frozen instead; they are small (a library's .data).
bool Session::PlanAndRegister(Failure* f) {
  for (size_t i = 0; i < maps.size(); i++) {
    if (!PlanBlock(i, f)) return false;
  }
  return true;
}

std::string BlockName(const MapEntry& m) {
  char name[64];
  snprintf(name, sizeof name, "%llx-%llx ", (unsigned long long)m.start, (unsigned long long)m.end);
  return name + m.perms + (m.path.empty() ? "" : " " + m.path);
}

// One mapping: skipped, or a new block, registered when the kernel lets us.
bool Session::PlanBlock(size_t i, Failure* f) {
  int fd = uffd_.load();
  MapEntry& m = maps[i];
  if (Skippable(m, &m.how)) {
    // The pre-protection may have registered it before it was found to be
    // MADV_DONTDUMP: unregistering drops its write-protection too.
    uffdio_range r{m.start, m.end - m.start};
    // Pre-copy's finish: either of its two userfaultfds may hold it.
    for (int u : {fd, asyncUffd_.load()}) {
      if (m.how == "MADV_DONTDUMP" && u >= 0) ioctl(u, UFFDIO_UNREGISTER, &r);
    }
    m.how = "skipped: " + m.how;
    return true;
  }
  if (!CheckBlockSize(m, f)) return false;
  Block b;
  b.start = m.start;
  b.length = m.end - m.start;
  b.pages = static_cast<uint32_t>(b.length / kPage);
  b.map = static_cast<int>(i);
  b.name = BlockName(m);
  b.done.Resize(b.pages);
  b.zeroPending.Resize(b.pages);
  uffdio_register reg{{m.start, b.length}, UFFDIO_REGISTER_MODE_WP, 0};
  bool ours = ioctl(fd, UFFDIO_REGISTER, &reg) == 0;
  // Pre-copy's finish: a mapping the target split or re-protected while still
  // on the asynchronous userfaultfd is ours there (SwitchToSync moves it).
  int async = asyncUffd_.load();
  if (!ours && errno == EBUSY && async >= 0 && ioctl(async, UFFDIO_REGISTER, &reg) == 0) ours = b.onAsync = true;
  if (ours) {
    b.kind = BlockKind::kProtected;
    b.anonPrivate = AnonPrivate(m);
    m.how = "protected";
  } else if (errno == EINVAL || errno == EBUSY) {
    b.kind = BlockKind::kCopied;
    b.anonPrivate = AnonPrivate(m);
    m.how = errno == EINVAL ? "copied: not protectable" : "copied: registered by the target";
  } else {
    return f->Set(errno, "UFFDIO_REGISTER of " + b.name);
  }
  m.block = static_cast<int>(blocks.size());
  blocks.push_back(std::move(b));
  return true;
}

// Never-touched pages of anonymous mappings we copy instead of protecting
// (ranges the target registered itself) are recorded as zero and not read.
// Protected mappings learn theirs in ProtectUnprotected's scan.
bool Session::ScanUntouched(Failure* f) {
  double t0 = NowMs();
  for (Block& b : blocks) {
    if (!b.anonPrivate || b.kind != BlockKind::kCopied || b.dead) continue;
    b.zeroPending.SetRange(0, b.pages);
    bool ok = ScanTouched(pagemapFd_, b.start, b.start + b.length, [&b](uint64_t s, uint64_t e, bool) {
      b.zeroPending.ClearRange((s - b.start) / kPage, (e - b.start) / kPage);
    }, f);
    if (!ok) break;
  }
  freeze.pagemapMs += NowMs() - t0;
  return !f->failed();
}

// Holes of shared memory (memfd, shmem, MAP_SHARED anonymous) read as zero, but
// reading them through the mapping allocates them in the target's shmem. Find
// them with SEEK_DATA/SEEK_HOLE on the mapping's file (/proc/PID/map_files, as
// root) and record them as zero, never read. A write through the target's
// mapping still traps (the protect put a marker there). Private mappings of a
// file are left alone: a copied-on-write page may hide a hole.
bool Session::ShmemHoles(Failure*) {
  double t0 = NowMs();
  for (Block& b : blocks) {
    if (b.dead || b.kind != BlockKind::kProtected || maps[b.map].perms[3] != 's') continue;
    const MapEntry& m = maps[b.map];
    char path[96];
    snprintf(path, sizeof path, "/proc/%d/map_files/%llx-%llx", pid_, (unsigned long long)m.start,
             (unsigned long long)m.end);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;  // then holes are read, which is correct, only costlier
    struct stat st;
    off_t pos = static_cast<off_t>(m.offset), end = pos + static_cast<off_t>(b.length);
    if (fstat(fd, &st) == 0) end = std::min(end, st.st_size);  // past EOF is not zero: leave it
    for (int extents = 0; pos < end && extents < 65536; extents++) {
      off_t data = lseek(fd, pos, SEEK_DATA);
      if (data < 0 && errno != ENXIO) break;
      off_t holeEnd = data < 0 ? end : std::min(data, end);
      b.zeroPending.SetRange(static_cast<uint32_t>((pos - m.offset) / kPage),
                             static_cast<uint32_t>((holeEnd - m.offset) / kPage));
      if (holeEnd >= end) break;
      pos = lseek(fd, holeEnd, SEEK_HOLE);
      if (pos < 0) break;
    }
    close(fd);
  }
  freeze.pagemapMs += NowMs() - t0;
  return true;
}

}  // namespace bgsnap
