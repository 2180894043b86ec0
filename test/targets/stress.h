// Extra activity for the "storm", "wx" and "selfuffd" modes of the invariant
// target, each next to the invariant region a capture checks:
//   storm:    allocator-style layout churn as fast as the kernel lets it
//             (MADV_DONTNEED storms on scratch areas, munmap + mmap of pieces
//             of another), never touching the region;
//   wx:       a JIT-like thread flipping code areas RW -> RX -> RW (and
//             PROT_NONE and back) and rewriting them; its progress is the last
//             thread's count, so allThreadsProgress sees it stuck;
//   selfuffd: a memfd range the target serves itself through its own
//             userfaultfd (MISSING mode) and a handler thread, most pages never
//             populated. "probe" reads one never-read page and prints it.
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

#define STORM_AREAS 32
#define STORM_AREA_PAGES 16
#define UNMAP_PAGES 16384  // 64 MiB, cut and replaced 4 pages at a time

static uint8_t *guarded(size_t pages) {  // PROT_NONE pages around it: never merged with a neighbour
  uint8_t *a = mmap(NULL, (pages + 2) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (a == MAP_FAILED) die("mmap guarded");
  if (mprotect(a + PAGE, pages * PAGE, PROT_READ | PROT_WRITE) != 0) die("mprotect guarded");
  memset(a + PAGE, 0x5a, pages * PAGE);
  return a + PAGE;
}

static void *dontneed_storm(void *arg) {
  uint8_t **areas = arg;
  for (uint64_t n = 0;; n++) {
    uint8_t *a = areas[n % STORM_AREAS];
    if (madvise(a, STORM_AREA_PAGES * PAGE, MADV_DONTNEED) != 0) die("madvise storm");
    for (int p = 0; p < STORM_AREA_PAGES; p++) a[p * PAGE] = (uint8_t)n;
  }
  return NULL;
}

static void *unmap_storm(void *arg) {
  uint8_t *big = arg;
  for (uint64_t n = 0;; n = (n + 4) % UNMAP_PAGES) {
    uint8_t *at = big + n * PAGE;
    if (munmap(at, 4 * PAGE) != 0) die("munmap storm");
    if (mmap(at, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
      die("mmap storm");
    at[0] = 1;
  }
  return NULL;
}

static void start_storm(void) {
  static uint8_t *areas[STORM_AREAS];
  for (int i = 0; i < STORM_AREAS; i++) areas[i] = guarded(STORM_AREA_PAGES);
  pthread_t th;
  pthread_create(&th, NULL, dontneed_storm, areas);
  pthread_create(&th, NULL, unmap_storm, guarded(UNMAP_PAGES));
}

// W^X: four code areas, each writable half of its period (5, 10, 20, 40 ms
// halves), rewritten when it turns writable, then PROT_NONE or executable for
// the other half, so at any instant some are writable and some
// not. Every page holds its area's version in all stamps; the page being
// written is named in the churn journal (page 0 at 2048).
#define WX_AREAS 4
#define WX_PAGES 16
static void wx_write(uint8_t *area, int a, uint64_t v) {
  struct churn_journal *cj = (struct churn_journal *)(region + 2048);
  for (int p = 0; p < WX_PAGES; p++) {
    uint64_t *w = (uint64_t *)(area + p * PAGE);
    cj->addr = (uint64_t)(uintptr_t)w; barrier(); cj->active = 1; barrier();
    w[0] = SCRATCH_MAGIC; w[1] = a; w[2] = p; w[3] = v;
    for (int k = 1; k <= STAMPS; k++) w[8 * k] = v;
    barrier(); cj->active = 0; barrier();
  }
}

static void *wx_flipper(void *arg) {
  int t = (int)(intptr_t)arg;
  uint8_t *area[WX_AREAS];
  int writable[WX_AREAS];
  for (int a = 0; a < WX_AREAS; a++) area[a] = guarded(WX_PAGES), writable[a] = 1;
  for (uint64_t tick = 1;; tick++) {
    for (int a = 0; a < WX_AREAS; a++) {
      uint64_t half = 5u << a, phase = tick / half;
      int want = phase % 2 == 0;
      if (want == writable[a]) continue;
      // Even areas go PROT_NONE (left out of a snapshot taken then, even anonymous),
      // odd ones executable (PROT_NONE every third time).
      int none = a % 2 == 0 || phase % 6 == 1;
      int prot = want ? PROT_READ | PROT_WRITE : none ? PROT_NONE : PROT_READ | PROT_EXEC;
      if (mprotect(area[a], WX_PAGES * PAGE, prot) != 0) die("mprotect W^X");
      if (want) wx_write(area[a], a, tick);
      writable[a] = want;
    }
    J(t)->count++;
    usleep(1000);
  }
  return NULL;
}

// The target's own userfaultfd over a memfd: a missing page is filled by the
// handler thread with {0x5346, page number}.
#define SELF_PAGES 256
static uint8_t *self_area;
static void *self_handler(void *arg) {
  int uffd = (int)(intptr_t)arg;
  static uint8_t page[PAGE] __attribute__((aligned(PAGE)));
  for (;;) {
    struct pollfd p = {uffd, POLLIN, 0};
    if (poll(&p, 1, -1) < 0) { if (errno == EINTR) die("poll (EINTR after freeze?)"); continue; }
    struct uffd_msg m;
    if (read(uffd, &m, sizeof m) != sizeof m) continue;
    if (m.event != UFFD_EVENT_PAGEFAULT) continue;
    uint64_t at = m.arg.pagefault.address & ~(uint64_t)(PAGE - 1);
    ((uint64_t *)page)[0] = 0x5346;
    ((uint64_t *)page)[1] = (at - (uint64_t)(uintptr_t)self_area) / PAGE;
    struct uffdio_copy c = {at, (uint64_t)(uintptr_t)page, PAGE, 0, 0};
    if (ioctl(uffd, UFFDIO_COPY, &c) != 0 && errno != EEXIST) die("UFFDIO_COPY");
  }
  return NULL;
}

static void start_selfuffd(void) {
  int fd = memfd_create("bgsnap-self", 0);
  if (fd < 0 || ftruncate(fd, SELF_PAGES * PAGE) != 0) die("memfd self");
  self_area = mmap(NULL, SELF_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (self_area == MAP_FAILED) die("mmap self");
  for (int p = 0; p < 8; p++) self_area[p * PAGE] = 1;  // populated; the rest stay holes
  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
  if (uffd < 0) die("userfaultfd (target)");
  struct uffdio_api api = {UFFD_API, 0, 0};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) die("UFFDIO_API (target)");
  struct uffdio_register reg = {{(uint64_t)(uintptr_t)self_area, SELF_PAGES * PAGE}, UFFDIO_REGISTER_MODE_MISSING, 0};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) die("UFFDIO_REGISTER (target)");
  pthread_t th;
  pthread_create(&th, NULL, self_handler, (void *)(intptr_t)uffd);
}

// Reads pages of the self-served range from the last one down, one per call, so
// each probe asks the handler for a page nobody has read yet.
static void probe(void) {
  static int next = SELF_PAGES - 1;
  if (!self_area) { printf("probe none\n"); fflush(stdout); return; }
  uint64_t *w = (uint64_t *)(self_area + (size_t)next * PAGE);
  printf("probe page=%d magic=%llx index=%llu\n", next, (unsigned long long)w[0], (unsigned long long)w[1]);
  fflush(stdout);
  next--;
}
