// What tracking writes between generations costs a writer (issue 10), for one
// method per run; bench/tracking-cost.ts runs all methods side by side.
//   tracking-cost MODE SIZE_MIB THP(0|1) INTERVAL_MS INTERVALS RANDOM_THREADS
// MODE: none (baseline) | sync | sync-fifo | sync-64k | async.
// Workload, over SIZE_MIB of private anonymous memory (2 MiB-aligned, THP or
// not, every page written first): RANDOM_THREADS threads each writing one
// 64-byte line of a random page, and one thread rewriting whole pages in order.
// Every interval ends with a collection while the writers wait at a barrier
// (as a generation's freeze would hold them), timed on its own:
//   sync:  the pages a handler thread recorded on write faults; it un-protected
//          each page (2 MiB on THP, to keep huge pages whole) and woke the
//          writer; the collection re-protects what was recorded. sync-fifo: the
//          handler runs SCHED_FIFO. sync-64k: it un-protects (and records) the
//          64 KiB around the page, fewer faults for more pages reported.
//   async: UFFD_FEATURE_WP_ASYNC; PAGEMAP_SCAN(PAGE_IS_WRITTEN, WP_MATCHING |
//          CHECK_WPASYNC) lists the written pages and re-protects them.
// The writers log every page they write per interval; the log is compared with
// what the method reported (missed must be 0; extra is granularity: whole huge
// pages for sync on THP). Each writer times its first write to a page in an
// interval: in sync mode, that write is the one that faults.
// Prints one JSON line.
#include "../test/targets/uffdtrack.h"

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <time.h>

enum { NONE, SYNC, SYNC_FIFO, SYNC_64K, ASYNC, NMODES };
#define IS_SYNC(m) ((m) == SYNC || (m) == SYNC_FIFO || (m) == SYNC_64K)
static int mode, thp, nrand;
static uint8_t *region;
static uint64_t npages;
static int uffd = -1, pagemap;

static uint8_t *logged;    // pages the writers wrote this interval
static uint8_t *recorded;  // pages the sync handler saw fault this interval
static uint8_t *reported;  // the method's answer at the interval's end
static volatile int paused, stop_writers, stop_handler;
static int acked;
static uint64_t faults;
static uint32_t *firsts;   // ns of each first write to a page in an interval
static uint64_t nfirsts, firstcap;
static uint64_t arm_ns, handler_cpu_ns, full_protects;  // full_protects: collections done as one ioctl

static uint64_t thread_cpu_ns(void) {
  struct rusage ru;
  getrusage(RUSAGE_THREAD, &ru);
  return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ull +
         (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ull;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// ---- the sync handler: record, un-protect, wake --------------------------
static void on_fault(uint64_t addr) {
  uint64_t unit = thp ? UT_HUGE : mode == SYNC_64K ? 16 * UT_PAGE : UT_PAGE, base = (uint64_t)(uintptr_t)region;
  uint64_t start = addr & ~(unit - 1);
  for (uint64_t p = (start - base) / UT_PAGE; p < (start - base + unit) / UT_PAGE; p++) recorded[p] = 1;
  faults++;
  ut_protect(uffd, start, unit, 0);
}

static void *handler(void *arg) {
  (void)arg;
  struct pollfd pf = {.fd = uffd, .events = POLLIN};
  struct uffd_msg msgs[64];
  while (!stop_handler) {
    if (poll(&pf, 1, 50) <= 0) continue;
    ssize_t n = read(uffd, msgs, sizeof msgs);
    if (n < 0 && errno != EAGAIN) ut_die("read userfaultfd", 0, 0);
    for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++)
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT) on_fault(msgs[i].arg.pagefault.address);
  }
  handler_cpu_ns = thread_cpu_ns();
  return NULL;
}

// ---- writers -------------------------------------------------------------
struct writer { int random; uint64_t seed, writes, cpu_ns; };

// The interval barrier: the controller sets `paused`; each writer finishes
// its write (a faulting one included) and waits here.
static void barrier(void) {
  __atomic_add_fetch(&acked, 1, __ATOMIC_ACQ_REL);
  while (__atomic_load_n(&paused, __ATOMIC_ACQUIRE)) sched_yield();
}

static void write_page(struct writer *w, uint64_t page) {
  uint64_t *p = (uint64_t *)(region + page * UT_PAGE);
  if (w->random) p += (w->seed & 63) * 8;
  int first = __atomic_exchange_n(&logged[page], 1, __ATOMIC_RELAXED) == 0;
  uint64_t t0 = first ? now_ns() : 0;
  if (w->random) for (int i = 0; i < 8; i++) p[i] = w->writes + i;
  else for (int i = 0; i < 512; i++) p[i] = w->writes + i;
  if (!first) return;
  uint64_t d = now_ns() - t0, at = __atomic_fetch_add(&nfirsts, 1, __ATOMIC_RELAXED);
  if (at < firstcap) firsts[at] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
}

static void *writer(void *arg) {
  struct writer *w = arg;
  uint64_t page = 0;
  while (!stop_writers) {
    if (__atomic_load_n(&paused, __ATOMIC_ACQUIRE)) { barrier(); continue; }
    if (w->random) {
      w->seed ^= w->seed << 13, w->seed ^= w->seed >> 7, w->seed ^= w->seed << 17;
      page = (w->seed >> 12) % npages;
    } else {
      page = page + 1 == npages ? 0 : page + 1;
    }
    write_page(w, page);
    w->writes++;
  }
  w->cpu_ns = thread_cpu_ns();
  return NULL;
}

// ---- collection at an interval's end -------------------------------------
static void mark(uint64_t first, uint64_t end, uint64_t cat, void *ctx) {
  (void)cat, (void)ctx;
  memset(reported + first, 1, end - first);
}

// Returns the pages the method reports; `reported` holds them.
static uint64_t collect(void) {
  memset(reported, 0, npages);
  if (mode == ASYNC) return ut_scan_written(pagemap, region, npages * UT_PAGE, 1, mark, NULL);
  if (mode == NONE) return 0;
  // Re-protect the recorded runs, or the whole region in one ioctl when that
  // is cheaper (~3 us per ioctl on this loaded machine, against the measured
  // full protect).
  uint64_t found = 0, runs = 0;
  for (uint64_t i = 0; i < npages; i++) {
    found += recorded[i];
    runs += recorded[i] && (i == 0 || !recorded[i - 1]);
  }
  memcpy(reported, recorded, npages);
  if (runs * 3000 > arm_ns) {
    full_protects++;
    ut_protect(uffd, (uint64_t)(uintptr_t)region, npages * UT_PAGE, 1);
  } else {
    for (uint64_t i = 0; i < npages;) {
      if (!recorded[i]) { i++; continue; }
      uint64_t j = i;
      while (j < npages && recorded[j]) j++;
      ut_protect(uffd, (uint64_t)(uintptr_t)(region + i * UT_PAGE), (j - i) * UT_PAGE, 1);
      i = j;
    }
  }
  memset(recorded, 0, npages);
  return found;
}

struct totals { uint64_t collect_ns, found, missed, extra, logged; };

static void check(struct totals *t) {
  if (mode == NONE) return;
  for (uint64_t i = 0; i < npages; i++) {
    t->logged += logged[i];
    t->missed += logged[i] && !reported[i];
    t->extra += reported[i] && !logged[i];
  }
}

// ---- set-up and the run ----------------------------------------------------
static void arm(void) {
  if (mode == NONE) return;
  uint64_t f = mode == ASYNC ? UT_FEATURE_WP_ASYNC : UFFD_FEATURE_PAGEFAULT_FLAG_WP;
  uffd = ut_open(f);
  ut_register(uffd, region, npages * UT_PAGE);
  uint64_t t0 = now_ns();
  ut_protect(uffd, (uint64_t)(uintptr_t)region, npages * UT_PAGE, 1);
  arm_ns = now_ns() - t0;
}

static void start_handler(pthread_t *h) {
  if (!IS_SYNC(mode)) return;
  if (pthread_create(h, NULL, handler, NULL) != 0) ut_die("pthread_create handler", 0, 0);
  struct sched_param sp = {.sched_priority = 1};
  int rc = mode == SYNC_FIFO ? pthread_setschedparam(*h, SCHED_FIFO, &sp) : 0;
  if (rc != 0) {
    errno = rc;  // pthread calls return the error rather than set errno
    ut_die("SCHED_FIFO for the handler (needs root or CAP_SYS_NICE)", 0, 0);
  }
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

// p50/p99/max of the first writes, and the mean of the `faults` slowest (the
// ones that faulted, in sync mode), all in µs.
static void first_writes(double out[4]) {
  uint64_t n = nfirsts < firstcap ? nfirsts : firstcap;
  memset(out, 0, 4 * sizeof out[0]);
  if (!n) return;
  qsort(firsts, n, sizeof firsts[0], cmp_u32);
  out[0] = firsts[n / 2] / 1e3, out[1] = firsts[n * 99 / 100] / 1e3, out[2] = firsts[n - 1] / 1e3;
  uint64_t k = faults < n ? faults : n;
  double sum = 0;
  for (uint64_t i = n - k; i < n; i++) sum += firsts[i];
  out[3] = k ? sum / k / 1e3 : 0;
}

static void run(int intervals, int interval_ms, struct writer *ws, int nw, struct totals *t, uint64_t *run_ns) {
  pthread_t th[64];
  for (int i = 0; i < nw; i++) pthread_create(&th[i], NULL, writer, &ws[i]);
  for (int k = 0; k < intervals; k++) {
    uint64_t t0 = now_ns();
    struct timespec d = {interval_ms / 1000, (long)(interval_ms % 1000) * 1000000L};
    nanosleep(&d, NULL);
    __atomic_store_n(&paused, 1, __ATOMIC_RELEASE);
    while (__atomic_load_n(&acked, __ATOMIC_ACQUIRE) < nw) sched_yield();
    *run_ns += now_ns() - t0;  // writing time: up to when all writers are held
    uint64_t c0 = now_ns();
    t->found += collect();
    t->collect_ns += now_ns() - c0;
    check(t);
    memset(logged, 0, npages);
    if (k == intervals - 1) stop_writers = 1;  // they leave the barrier and stop, writing nothing more
    __atomic_store_n(&acked, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&paused, 0, __ATOMIC_RELEASE);
  }
  for (int i = 0; i < nw; i++) pthread_join(th[i], NULL);
  stop_handler = 1;
}

static void report(const char *name, int intervals, struct writer *ws, int nw, struct totals *t, uint64_t run_ns) {
  uint64_t rw = 0, sw = 0, cpu = handler_cpu_ns;
  for (int i = 0; i < nw; i++) *(ws[i].random ? &rw : &sw) += ws[i].writes, cpu += ws[i].cpu_ns;
  double s = run_ns / 1e9, fw[4], gib = npages * UT_PAGE / (double)(1ull << 30);
  first_writes(fw);
  printf("{\"mode\":\"%s\",\"mib\":%llu,\"thp\":%d,\"intervals\":%d,\"seconds\":%.3f,"
         "\"randomWritesPerS\":%.0f,\"seqPagesPerS\":%.0f,\"collectMsPerInterval\":%.3f,\"collectMsPerGiB\":%.3f,"
         "\"foundPerInterval\":%.0f,\"loggedPerInterval\":%.0f,\"missed\":%llu,\"extra\":%llu,"
         "\"faultsPerInterval\":%.0f,\"firstWriteUs\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.1f,\"slowestMean\":%.2f},"
         "\"hugePagesEnd\":%llu,\"writerCpuS\":%.3f,\"handlerCpuS\":%.3f,\"armMs\":%.2f,\"fullProtects\":%llu}\n",
         name, (unsigned long long)(npages * UT_PAGE >> 20), thp, intervals, s, rw / s, sw / s,
         t->collect_ns / 1e6 / intervals, t->collect_ns / 1e6 / intervals / gib, (double)t->found / intervals,
         (double)t->logged / intervals, (unsigned long long)t->missed, (unsigned long long)t->extra,
         (double)faults / intervals, fw[0], fw[1], fw[2], fw[3],
         (unsigned long long)ut_huge_pages(pagemap, region, npages * UT_PAGE), (cpu - handler_cpu_ns) / 1e9,
         handler_cpu_ns / 1e9, arm_ns / 1e6, (unsigned long long)full_protects);
}

int main(int argc, char **argv) {
  if (argc < 7) { fprintf(stderr, "usage: tracking-cost none|sync|sync-fifo|sync-64k|async SIZE_MIB THP INTERVAL_MS INTERVALS RANDOM_THREADS\n"); return 2; }
  const char *names[] = {"none", "sync", "sync-fifo", "sync-64k", "async"};
  for (mode = 0; mode < NMODES && strcmp(argv[1], names[mode]); mode++) {}
  if (mode == NMODES) { fprintf(stderr, "unknown mode %s\n", argv[1]); return 2; }
  npages = ((uint64_t)atol(argv[2]) << 20) / UT_PAGE, thp = atoi(argv[3]), nrand = atoi(argv[6]);
  int interval_ms = atoi(argv[4]), intervals = atoi(argv[5]), nw = nrand + 1;
  if (nw > 64 || npages == 0 || intervals <= 0) { fprintf(stderr, "bad arguments\n"); return 2; }
  region = ut_region(npages * UT_PAGE, thp);
  for (uint64_t i = 0; i < npages; i++) memset(region + i * UT_PAGE, 0x11, UT_PAGE);
  pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  logged = calloc(npages, 1), recorded = calloc(npages, 1), reported = calloc(npages, 1);
  firstcap = npages * (uint64_t)intervals, firsts = malloc(firstcap * sizeof firsts[0]);
  if (pagemap < 0 || !logged || !recorded || !reported || !firsts) ut_die("set-up", 0, npages);
  arm();
  pthread_t h;
  start_handler(&h);
  struct writer ws[64] = {{0}};
  for (int i = 0; i < nw; i++) ws[i] = (struct writer){.random = i < nrand, .seed = 0x9e3779b97f4a7c15ull * (i + 1)};
  struct totals t = {0};
  uint64_t run_ns = 0;
  run(intervals, interval_ms, ws, nw, &t, &run_ns);
  if (IS_SYNC(mode)) pthread_join(h, NULL);
  report(names[mode], intervals, ws, nw, &t, run_ns);
  return 0;
}
