// Write tracking on our own memory with userfaultfd, shared by
// test/targets/thpdrop.c and bench/tracking-cost.c. The two ways the kernel
// offers to learn which pages were written since an instant:
//   sync:  write-protect (UFFDIO_WRITEPROTECT); each first write faults to a
//          handler thread that records the page and un-protects it;
//   async: UFFD_FEATURE_WP_ASYNC: the kernel un-protects on a write by itself,
//          and PAGEMAP_SCAN(PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING) lists the
//          written pages and re-protects them in one walk.
// The uffd is our own (same mm) rather than injected into another process:
// the kernel's fault and walk costs are the same, and it keeps these programs
// free of ptrace.
#pragma once
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

// Linux 6.4/6.7 uapi; the build machine's headers (Debian 12) predate it.
#define UT_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define UT_FEATURE_WP_ASYNC (1ULL << 15)
struct ut_region { uint64_t start, end, categories; };
struct ut_scan_arg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
  uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define UT_PAGEMAP_SCAN _IOWR('f', 16, struct ut_scan_arg)
#define UT_PAGE_IS_WRITTEN (1ULL << 1)
#define UT_PAGE_IS_PRESENT (1ULL << 3)
#define UT_PAGE_IS_HUGE (1ULL << 6)
#define UT_SCAN_WP_MATCHING (1ULL << 0)
#define UT_SCAN_CHECK_WPASYNC (1ULL << 1)

#define UT_PAGE 4096UL
#define UT_HUGE (2UL << 20)

// Errors name the call and where; the errno goes out as the exit code's reason.
static inline void ut_die(const char *what, uint64_t addr, uint64_t len) {
  fprintf(stderr, "error %s at 0x%llx+0x%llx: %s (errno %d)\n", what, (unsigned long long)addr,
          (unsigned long long)len, strerror(errno), errno);
  exit(3);
}

// A userfaultfd on our mm with `features` (UFFDIO_API fails if one is missing).
static inline int ut_open(uint64_t features) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) ut_die("userfaultfd", 0, 0);
  struct uffdio_api api = {.api = UFFD_API, .features = features};
  if (ioctl(fd, UFFDIO_API, &api) != 0) ut_die("UFFDIO_API", features, 0);
  return fd;
}

static inline void ut_register(int fd, void *p, uint64_t len) {
  struct uffdio_register r = {.range = {(uint64_t)(uintptr_t)p, len}, .mode = UFFDIO_REGISTER_MODE_WP};
  if (ioctl(fd, UFFDIO_REGISTER, &r) != 0) ut_die("UFFDIO_REGISTER", r.range.start, len);
}

// Protect (on) or un-protect and wake the faulting writers (off). EAGAIN means
// a mapping change (madvise, munmap) is in flight: its event must be read
// first, which another thread does, so yield and retry.
static inline void ut_protect(int fd, uint64_t addr, uint64_t len, int on) {
  struct uffdio_writeprotect wp = {.range = {addr, len}, .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
  while (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) != 0) {
    if (errno != EAGAIN) ut_die("UFFDIO_WRITEPROTECT", addr, len);
    usleep(50);
  }
}

// Calls fn(first_page, end_page, categories, ctx) (page indices from `base`)
// for every run of written pages in [base, base+len); `rearm` re-protects
// them in the same walk. Returns the number of written pages.
typedef void (*ut_run_fn)(uint64_t first, uint64_t end, uint64_t categories, void *ctx);
static inline uint64_t ut_scan_written(int pagemap, void *base, uint64_t len, int rearm, ut_run_fn fn, void *ctx) {
  static __thread struct ut_region vec[4096];
  uint64_t b = (uint64_t)(uintptr_t)base, found = 0;
  struct ut_scan_arg a = {.size = sizeof a, .start = b, .end = b + len, .vec = (uint64_t)(uintptr_t)vec,
                          .vec_len = 4096, .category_mask = UT_PAGE_IS_WRITTEN,
                          .return_mask = UT_PAGE_IS_WRITTEN | UT_PAGE_IS_HUGE | UT_PAGE_IS_PRESENT};
  if (rearm) a.flags = UT_SCAN_WP_MATCHING | UT_SCAN_CHECK_WPASYNC;
  while (a.start < a.end) {
    int n = ioctl(pagemap, UT_PAGEMAP_SCAN, &a);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      ut_die("PAGEMAP_SCAN", a.start, a.end - a.start);
    }
    for (int i = 0; i < n; i++) {
      found += (vec[i].end - vec[i].start) / UT_PAGE;
      if (fn) fn((vec[i].start - b) / UT_PAGE, (vec[i].end - b) / UT_PAGE, vec[i].categories, ctx);
    }
    if (a.walk_end <= a.start) break;
    a.start = a.walk_end;
  }
  return found;
}

// A 2 MiB-aligned anonymous region of len bytes, THP-backed or not.
#include <sys/mman.h>
static inline uint8_t *ut_region(uint64_t len, int thp) {
  uint8_t *raw = mmap(NULL, len + UT_HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) ut_die("mmap", 0, len);
  uint8_t *p = (uint8_t *)(((uintptr_t)raw + UT_HUGE - 1) & ~(UT_HUGE - 1));
  if (madvise(p, len, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) ut_die("madvise", (uintptr_t)p, len);
  return p;
}

// How many of the region's pages are mapped by huge pages now.
static inline void ut_count_huge(uint64_t first, uint64_t end, uint64_t cat, void *ctx) {
  if (cat & UT_PAGE_IS_HUGE) *(uint64_t *)ctx += end - first;
}
static inline uint64_t ut_huge_pages(int pagemap, void *base, uint64_t len) {
  static __thread struct ut_region vec[4096];
  uint64_t b = (uint64_t)(uintptr_t)base, n = 0;
  struct ut_scan_arg a = {.size = sizeof a, .start = b, .end = b + len, .vec = (uint64_t)(uintptr_t)vec,
                          .vec_len = 4096, .category_mask = UT_PAGE_IS_HUGE, .return_mask = UT_PAGE_IS_HUGE};
  while (a.start < a.end) {
    int r = ioctl(pagemap, UT_PAGEMAP_SCAN, &a);
    if (r < 0) ut_die("PAGEMAP_SCAN (huge)", a.start, len);
    for (int i = 0; i < r; i++) ut_count_huge(0, (vec[i].end - vec[i].start) / UT_PAGE, vec[i].categories, &n);
    if (a.walk_end <= a.start) break;
    a.start = a.walk_end;
  }
  return n;
}
