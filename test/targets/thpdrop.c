// The kernel case of issue 10: a transparent huge page dropped with
// MADV_DONTNEED while its writes are tracked. A July 2026 kernel fix concerns
// PAGEMAP_SCAN missing the "written" state of ranges with no page table, which
// is what a whole THP leaves behind when it is dropped.
//
//   thpdrop sync|async REMOVE(0|1) [UNPOPULATED(1|0)]
//
// Region: 3 THPs (MADV_HUGEPAGE) then 2 MiB of 4 KiB pages (MADV_NOHUGEPAGE),
// 2 MiB-aligned, every page written (0x11). Tracking armed (all protected),
// then three intervals, each ended by a collection that prints what the method
// reports (page indices from the region's start):
//   1: write page 3 (THP0)
//   2: write page 5; MADV_DONTNEED THP1 and THP2; write pages 512+10, 512+11;
//      MADV_DONTNEED pages 1536+30..1536+40 (4 KiB); write page 1536+31
//   3: write pages 7, 512+12, 1024+20, 1536+32
// Lines: "interval=K written=RUNS removed=RUNS huge=N" (RUNS: a-b,c-d, end
// exclusive, or "-"); "huge" counts pages mapped by huge pages before the
// region was dropped (first line "armed huge=N").
// sync: faults go to a handler thread that records the page and un-protects
// its 4 KiB; the collection re-protects what was recorded or removed (with
// UFFD_FEATURE_WP_UNPOPULATED, so a range with no pages gets protected too;
// UNPOPULATED=0 leaves that feature out).
// async: UFFD_FEATURE_WP_ASYNC; the collection is PAGEMAP_SCAN with
// PM_SCAN_WP_MATCHING. REMOVE=1 asks for UFFD_EVENT_REMOVE, read by the same
// handler thread (madvise waits until it is read).
#include "uffdtrack.h"

#include <poll.h>
#include <pthread.h>

#define NPAGES (4 * UT_HUGE / UT_PAGE)
#define SMALL (3 * UT_HUGE / UT_PAGE)  // first page of the 4 KiB chunk
static uint8_t *region;
static int uffd, pagemap;
static uint8_t faulted[NPAGES], removed[NPAGES];  // set by the handler thread
static volatile int stop;
// The kernel lets madvise return once the REMOVE event was read, which can be
// before the handler thread marked it: drop() waits for the mark (else a
// collection right after it can miss the range: 38 runs of 200 did).
static uint64_t removes_handled;
static int want_removes;

static void handle(const struct uffd_msg *m) {
  uint64_t base = (uint64_t)(uintptr_t)region;
  if (m->event == UFFD_EVENT_PAGEFAULT) {
    uint64_t page = (m->arg.pagefault.address & ~(UT_PAGE - 1));
    __atomic_store_n(&faulted[(page - base) / UT_PAGE], 1, __ATOMIC_RELEASE);
    ut_protect(uffd, page, UT_PAGE, 0);
  } else if (m->event == UFFD_EVENT_REMOVE) {
    for (uint64_t a = m->arg.remove.start; a < m->arg.remove.end; a += UT_PAGE)
      if (a >= base && a < base + NPAGES * UT_PAGE) __atomic_store_n(&removed[(a - base) / UT_PAGE], 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&removes_handled, 1, __ATOMIC_RELEASE);
  }
}

static void *handler(void *arg) {
  (void)arg;
  struct pollfd p = {.fd = uffd, .events = POLLIN};
  while (!stop) {
    if (poll(&p, 1, 20) <= 0) continue;
    struct uffd_msg msgs[16];
    ssize_t n = read(uffd, msgs, sizeof msgs);
    if (n < 0 && errno != EAGAIN) ut_die("read uffd", 0, 0);
    for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) handle(&msgs[i]);
  }
  return NULL;
}

static void print_runs(const char *name, const uint8_t *set) {
  printf(" %s=", name);
  int any = 0;
  for (uint64_t i = 0; i < NPAGES;) {
    if (!set[i]) { i++; continue; }
    uint64_t j = i;
    while (j < NPAGES && set[j]) j++;
    printf("%s%llu-%llu", any ? "," : "", (unsigned long long)i, (unsigned long long)j);
    any = 1;
    i = j;
  }
  if (!any) printf("-");
}

static uint8_t written[NPAGES];
static void mark(uint64_t first, uint64_t end, uint64_t cat, void *ctx) {
  (void)cat, (void)ctx;
  for (uint64_t i = first; i < end; i++) written[i] = 1;
}

// sync: re-protect every page recorded or removed, in runs.
static void reprotect(const uint8_t *a, const uint8_t *b) {
  for (uint64_t i = 0; i < NPAGES;) {
    if (!a[i] && !b[i]) { i++; continue; }
    uint64_t j = i;
    while (j < NPAGES && (a[j] || b[j])) j++;
    ut_protect(uffd, (uint64_t)(uintptr_t)(region + i * UT_PAGE), (j - i) * UT_PAGE, 1);
    i = j;
  }
}

static void collect(int k, int async) {
  memset(written, 0, sizeof written);
  if (async) ut_scan_written(pagemap, region, NPAGES * UT_PAGE, 1, mark, NULL);
  else for (uint64_t i = 0; i < NPAGES; i++) written[i] = __atomic_load_n(&faulted[i], __ATOMIC_ACQUIRE);
  printf("interval=%d", k);
  print_runs("written", written);
  print_runs("removed", removed);
  printf(" huge=%llu\n", (unsigned long long)ut_huge_pages(pagemap, region, NPAGES * UT_PAGE));
  fflush(stdout);
  if (!async) reprotect(written, removed);
  memset(faulted, 0, sizeof faulted);
  memset(removed, 0, sizeof removed);
}

static void w(uint64_t page) { region[page * UT_PAGE + 64] = 0x22; }

static void drop(uint64_t page, uint64_t n) {
  uint64_t before = __atomic_load_n(&removes_handled, __ATOMIC_ACQUIRE);
  if (madvise(region + page * UT_PAGE, n * UT_PAGE, MADV_DONTNEED) != 0) ut_die("MADV_DONTNEED", (uintptr_t)(region + page * UT_PAGE), n * UT_PAGE);
  while (want_removes && __atomic_load_n(&removes_handled, __ATOMIC_ACQUIRE) == before) usleep(100);
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: thpdrop sync|async REMOVE(0|1)\n"); return 2; }
  int async = strcmp(argv[1], "async") == 0, rm = atoi(argv[2]), unpop = argc > 3 ? atoi(argv[3]) : 1;
  want_removes = rm;
  region = ut_region(NPAGES * UT_PAGE, 1);
  if (madvise(region + SMALL * UT_PAGE, UT_HUGE, MADV_NOHUGEPAGE) != 0) ut_die("madvise", (uintptr_t)region, UT_HUGE);
  for (uint64_t i = 0; i < NPAGES; i++) memset(region + i * UT_PAGE, 0x11, UT_PAGE);
  pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (pagemap < 0) ut_die("open /proc/self/pagemap", 0, 0);
  uint64_t f = (async ? UT_FEATURE_WP_ASYNC : UFFD_FEATURE_PAGEFAULT_FLAG_WP | (unpop ? UT_FEATURE_WP_UNPOPULATED : 0)) |
               (rm ? UFFD_FEATURE_EVENT_REMOVE : 0);
  uffd = ut_open(f);
  ut_register(uffd, region, NPAGES * UT_PAGE);
  ut_protect(uffd, (uint64_t)(uintptr_t)region, NPAGES * UT_PAGE, 1);
  printf("armed huge=%llu\n", (unsigned long long)ut_huge_pages(pagemap, region, NPAGES * UT_PAGE));
  pthread_t t;
  int rc = pthread_create(&t, NULL, handler, NULL);
  if (rc != 0) errno = rc, ut_die("pthread_create", 0, 0);
  w(3);
  collect(1, async);
  w(5), drop(512, 512), drop(1024, 512), w(512 + 10), w(512 + 11);
  drop(SMALL + 30, 10), w(SMALL + 31);
  collect(2, async);
  w(7), w(512 + 12), w(1024 + 20), w(SMALL + 32);
  collect(3, async);
  stop = 1;
  pthread_join(t, NULL);
  return 0;
}
