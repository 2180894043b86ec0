// Reading the target through /proc: its mappings, small state files, and which
// pages were ever touched (PAGEMAP_SCAN, one ioctl per range instead of 8 bytes
// of /proc/PID/pagemap per page: ~1.7 ms against 18-30 ms per 2 GiB).
#include "procfs.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>

namespace bgsnap {

// PAGEMAP_SCAN (Linux 6.7); the build machine's headers may predate it.
struct PageRegion {
  uint64_t start, end, categories;
};
struct PmScanArg {
  uint64_t size, flags, start, end, walkEnd, vec, vecLen, maxPages;
  uint64_t categoryInverted, categoryMask, categoryAnyofMask, returnMask;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);

bool ReadWhole(const std::string& path, std::string* out) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  out->clear();
  char buf[65536];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out->append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return true;
}

static bool ParseMapLine(const std::string& line, MapEntry* m) {
  char perms[8] = {0}, dev[16] = {0};
  int pathAt = 0;
  unsigned long long start, end, off, inode;
  if (sscanf(line.c_str(), "%llx-%llx %7s %llx %15s %llu %n", &start, &end, perms, &off, dev,
             &inode, &pathAt) < 6) {
    return false;
  }
  m->start = start;
  m->end = end;
  m->perms = perms;
  m->offset = off;
  m->dev = dev;
  m->inode = inode;
  m->path = pathAt > 0 && static_cast<size_t>(pathAt) <= line.size() ? line.substr(pathAt) : "";
  return true;
}

bool ParseMaps(const std::string& text, std::vector<MapEntry>* out) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    MapEntry m;
    if (ParseMapLine(text.substr(pos, nl - pos), &m)) out->push_back(m);
    pos = nl + 1;
  }
  return !out->empty();
}

// Header lines start "START-END "; a field line's name never parses as two hex
// numbers joined by '-'. VmFlags is the last field of each VMA.
bool ParseSmaps(const std::string& text, std::vector<VmaFlags>* out) {
  out->clear();
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    unsigned long long start, end;
    char dash;
    if (sscanf(line.c_str(), "%llx%c%llx ", &start, &dash, &end) == 3 && dash == '-') {
      out->push_back({start, end, false});
    } else if (line.rfind("VmFlags:", 0) == 0 && !out->empty()) {
      out->back().dontDump = (line + " ").find(" dd ") != std::string::npos;
    }
    pos = nl + 1;
  }
  return !out->empty();
}

static bool Scan(int pagemapFd, uint64_t start, uint64_t end, uint64_t mask, uint64_t anyof,
                 uint64_t ret, const std::function<void(uint64_t, uint64_t, uint64_t)>& fn,
                 Failure* f, uint64_t flags = 0) {
  std::vector<PageRegion> vec(4096);
  PmScanArg a{};
  a.size = sizeof a;
  a.start = start;
  a.end = end;
  a.vec = reinterpret_cast<uint64_t>(vec.data());
  a.vecLen = vec.size();
  a.categoryMask = mask;
  a.categoryAnyofMask = anyof;
  a.returnMask = ret;
  a.flags = flags;
  while (a.start < end) {
    int n = ioctl(pagemapFd, kPagemapScan, &a);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (flags && errno == EPERM) {
        char at[64];
        snprintf(at, sizeof at, "0x%" PRIx64 "-0x%" PRIx64, a.start, end);
        return f->Set(errno, std::string("write-protecting written pages again (PAGEMAP_SCAN) in ") + at +
                                 ": a mapping there is not registered by this capture's userfaultfd");
      }
      return f->Set(errno, "PAGEMAP_SCAN ioctl (needs Linux 6.7+)");
    }
    for (int i = 0; i < n; i++) fn(vec[i].start, vec[i].end, vec[i].categories);
    if (a.walkEnd <= a.start) break;
    a.start = a.walkEnd;
  }
  return true;
}

bool ScanPagemap(int pagemapFd, uint64_t start, uint64_t end, uint64_t mask, uint64_t ret,
                 const std::function<void(uint64_t, uint64_t, uint64_t)>& fn, Failure* f) {
  return Scan(pagemapFd, start, end, mask, 0, ret, fn, f);
}

// PM_SCAN_WP_MATCHING: the kernel write-protects each page it reports, under
// the page table lock, in the same walk. A write after the walk passed a page
// is caught by the new protection; one before it is in the report. Against a
// scan and then an ioctl per run (each flushing the TLB of every CPU running
// the target), one walk: Redis's 40k written pages took 125-330 ms of
// UFFDIO_WRITEPROTECTs between two passes, 5-8 ms this way.
// PM_SCAN_CHECK_WPASYNC (strict) fails on a mapping not ours (EPERM) instead of
// skipping it; the pages walked before it are then protected but unreported,
// so the caller must treat that as the end of the capture.
bool ProtectWritten(int pagemapFd, uint64_t start, uint64_t end, bool strict,
                    const std::function<void(uint64_t, uint64_t, uint64_t)>& fn, Failure* f) {
  return Scan(pagemapFd, start, end, kPageIsWritten, 0,
              kPageIsWritten | kPageIsPresent | kPageIsSwapped | kPageIsHuge, fn, f, strict ? 1 | 2 : 1);
}

// Calls fn(start, end, huge) for every run of pages that are present or swapped.
bool ScanTouched(int pagemapFd, uint64_t start, uint64_t end,
                 const std::function<void(uint64_t, uint64_t, bool)>& fn, Failure* f) {
  return Scan(pagemapFd, start, end, 0, kPageIsPresent | kPageIsSwapped,
              kPageIsPresent | kPageIsSwapped | kPageIsHuge,
              [&fn](uint64_t s, uint64_t e, uint64_t c) { fn(s, e, c & kPageIsHuge); }, f);
}

int HugeAt(int pagemapFd, uint64_t addr) {
  PageRegion r{};
  PmScanArg a{};
  a.size = sizeof a;
  a.start = addr & ~(kPage - 1);
  a.end = a.start + kPage;
  a.vec = reinterpret_cast<uint64_t>(&r);
  a.vecLen = 1;
  a.returnMask = kPageIsHuge | kPageIsPresent;
  int n = ioctl(pagemapFd, kPagemapScan, &a);
  if (n < 0) return -1;
  return n == 1 && (r.categories & kPageIsHuge) ? 1 : 0;
}

}  // namespace bgsnap
