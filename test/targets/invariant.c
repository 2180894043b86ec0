// Test target for process capture: threads keep moving value between random
// pages of one region, conserving the total, so a snapshot that is not one
// point in time (pages copied at different moments) breaks the sum.
//
//   invariant MODE SIZE_MIB WRITERS      MODE: anon | shared | memfd | thp | churn
//                                        | storm | wx | selfuffd (stress.h)
//                                        | selffuse (selffuse.h, root)
//
// Layout of the region: page 0 holds the header and one journal per thread;
// pages 1.. hold {value, lock, gen, stamps}. A transfer locks two pages, writes
// its journal (old values, amount), then the two pages, then clears the journal.
// Each thread's stores are ordered (compiler barriers; x86 is TSO), so a frozen
// instant shows a prefix of them and the journal tells how to complete it.
//
// The process forks itself into the background (so it is not the test runner's
// child: the runner's own waitpid would otherwise see our ptrace stops), prints
// "ready ..." and then obeys fd 3 (or stdin): "check" verifies the live memory with the
// writers paused and prints "check ok|bad <details>", "counts" prints per-thread
// progress, "quit" exits. Any EINTR is fatal: freezing must not cause one.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define MAXT 16
#define INITIAL 1000
#define STAMPS 63  // one 8-byte stamp per remaining cache line
#define barrier() __asm__ __volatile__("" ::: "memory")

struct journal {  // 64 bytes, in page 0 at 256 + 64 * thread
  volatile uint64_t active, i, j, count;
  volatile int64_t d, oldi, oldj, pad;
};
struct header {
  uint64_t magic, pages, threads, initial;
};
struct page {
  volatile int64_t value;
  volatile uint32_t lock, pad;
  volatile uint64_t gen;
  uint8_t rest[PAGE - 24];  // stamps at 64 * k for k = 1..63
};

static uint8_t *region;
static uint64_t npages;
static int nthreads;
static volatile int paused, parked, busy;  // busy: threads inside a transfer
static int pipefd[2];

static struct journal *J(int t) { return (struct journal *)(region + 256 + 64 * t); }
static struct page *P(uint64_t i) { return (struct page *)(region + i * PAGE); }
static void die(const char *what) { fprintf(stderr, "%s: %s\n", what, strerror(errno)); _exit(3); }

static uint64_t rnd(uint64_t *s) {
  *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
  return *s;
}

static int trylock(struct page *p) { return __sync_bool_compare_and_swap(&p->lock, 0, 1); }
static void unlock(struct page *p) { __atomic_store_n(&p->lock, 0, __ATOMIC_RELEASE); }

static void stamp(struct page *p) {
  uint64_t g = p->gen + 1;
  p->gen = g;
  for (int k = 1; k <= STAMPS; k++) *(volatile uint64_t *)((uint8_t *)p + 64 * k) = g;
}

static void transfer(int t, uint64_t *seed) {
  for (;;) {
    // Announce first, then look at `paused`: check() sets paused, then waits for
    // busy == 0, so no transfer can be half done while it sums (even when a
    // thread was preempted for a long time on a loaded machine).
    __atomic_add_fetch(&busy, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&paused, __ATOMIC_SEQ_CST)) {
      __atomic_sub_fetch(&busy, 1, __ATOMIC_SEQ_CST);
      __atomic_add_fetch(&parked, 1, __ATOMIC_SEQ_CST);
      while (paused) usleep(100);
      __atomic_sub_fetch(&parked, 1, __ATOMIC_SEQ_CST);
      continue;
    }
    uint64_t i = 1 + rnd(seed) % (npages - 1), j = 1 + rnd(seed) % (npages - 1);
    if (i == j) { __atomic_sub_fetch(&busy, 1, __ATOMIC_SEQ_CST); continue; }
    struct page *a = P(i < j ? i : j), *b = P(i < j ? j : i);
    if (!trylock(a)) { __atomic_sub_fetch(&busy, 1, __ATOMIC_SEQ_CST); continue; }
    if (!trylock(b)) { unlock(a); __atomic_sub_fetch(&busy, 1, __ATOMIC_SEQ_CST); continue; }
    struct journal *jr = J(t);
    int64_t d = (int64_t)(rnd(seed) % 100) + 1;
    jr->i = i; jr->j = j; jr->d = d; jr->oldi = P(i)->value; jr->oldj = P(j)->value;
    barrier(); jr->active = 1; barrier();
    P(i)->value = jr->oldi - d; barrier(); stamp(P(i)); barrier();
    P(j)->value = jr->oldj + d; barrier(); stamp(P(j)); barrier();
    jr->active = 0; barrier();
    jr->count++;
    unlock(b); unlock(a);
    __atomic_sub_fetch(&busy, 1, __ATOMIC_SEQ_CST);
    return;
  }
}

static void *writer(void *arg) {
  int t = (int)(intptr_t)arg;
  uint64_t seed = 0x9e3779b97f4a7c15ull * (t + 1);
  for (;;) transfer(t, &seed);
  return NULL;
}

// Often asleep in nanosleep; feeds the reader's pipe.
static void *sleeper(void *arg) {
  int t = (int)(intptr_t)arg;
  uint64_t seed = 77 + t;
  struct timespec ts = {0, 500000};
  for (;;) {
    if (nanosleep(&ts, NULL) != 0) die("nanosleep (EINTR after freeze?)");
    transfer(t, &seed);
    if (write(pipefd[1], "x", 1) != 1) die("write");
  }
  return NULL;
}

// Almost always blocked in read() on a pipe.
static void *reader(void *arg) {
  int t = (int)(intptr_t)arg;
  uint64_t seed = 99 + t;
  char c;
  for (;;) {
    ssize_t n = read(pipefd[0], &c, 1);
    if (n != 1) die("read (EINTR after freeze?)");
    transfer(t, &seed);
  }
  return NULL;
}

#include "churn.h"
#include "stress.h"
#include "selffuse.h"

static void check(void) {
  __atomic_store_n(&paused, 1, __ATOMIC_SEQ_CST);
  while (__atomic_load_n(&busy, __ATOMIC_SEQ_CST) != 0) usleep(100);
  int64_t sum = 0;
  uint64_t bad = 0;
  for (uint64_t i = 1; i < npages; i++) {
    sum += P(i)->value;
    for (int k = 1; k <= STAMPS; k++)
      if (*(uint64_t *)((uint8_t *)P(i) + 64 * k) != P(i)->gen) { bad++; break; }
  }
  int64_t want = (int64_t)(npages - 1) * INITIAL;
  printf("check %s sum=%lld want=%lld badstamps=%llu\n", sum == want && !bad ? "ok" : "bad",
         (long long)sum, (long long)want, (unsigned long long)bad);
  fflush(stdout);
  paused = 0;
}

static void counts(void) {
  printf("counts");
  for (int t = 0; t < nthreads; t++) printf(" %llu", (unsigned long long)J(t)->count);
  printf("\n");
  fflush(stdout);
}

static uint8_t *map_region(const char *mode, size_t size) {
  int flags = MAP_PRIVATE | MAP_ANONYMOUS, fd = -1;
  if (!strcmp(mode, "shared")) flags = MAP_SHARED | MAP_ANONYMOUS;
  if (!strcmp(mode, "memfd")) {
    fd = memfd_create("bgsnap-test", 0);
    if (fd < 0 || ftruncate(fd, size) != 0) die("memfd");
    flags = MAP_SHARED;
  }
  size_t extra = !strcmp(mode, "thp") ? (2u << 20) : 0;
  uint8_t *p = mmap(NULL, size + extra, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) die("mmap");
  if (extra) {  // 2 MiB aligned so every part of it can be a huge page
    uint8_t *a = (uint8_t *)(((uintptr_t)p + extra - 1) & ~(uintptr_t)(extra - 1));
    if (a > p) munmap(p, a - p);
    munmap(a + size, p + extra - a);
    p = a;
    if (madvise(p, size, MADV_HUGEPAGE) != 0) die("madvise(MADV_HUGEPAGE)");
  }
  return p;
}

static void init(const char *mode, size_t size, int writers) {
  npages = size / PAGE;
  nthreads = writers + 2 + !strcmp(mode, "wx");
  region = map_region(mode, size);
  struct header *h = (struct header *)region;
  h->magic = 0x746e617672617662ull;  // "bvariant"
  h->pages = npages;
  h->threads = nthreads;
  h->initial = INITIAL;
  for (uint64_t i = 1; i < npages; i++) { P(i)->value = INITIAL; stamp(P(i)); }
  if (pipe(pipefd) != 0) die("pipe");
}

int main(int argc, char **argv) {
  if (argc < 4) { fprintf(stderr, "usage: %s MODE SIZE_MIB WRITERS\n", argv[0]); return 2; }
  const char *mode = argv[1];
  size_t size = (size_t)atol(argv[2]) << 20;
  int writers = atoi(argv[3]);
  if (writers < 0 || writers + 2 > MAXT) return 2;  // 0: only the sleeper and reader (a nearly idle target)
  pid_t child = fork();
  if (child < 0) die("fork");
  if (child > 0) _exit(0);
  init(mode, size, writers);
  pthread_t th;
  for (int t = 0; t < writers; t++) pthread_create(&th, NULL, writer, (void *)(intptr_t)t);
  pthread_create(&th, NULL, sleeper, (void *)(intptr_t)writers);
  pthread_create(&th, NULL, reader, (void *)(intptr_t)(writers + 1));
  if (!strcmp(mode, "churn")) start_churn();
  if (!strcmp(mode, "storm")) start_storm();
  if (!strcmp(mode, "selfuffd")) start_selfuffd();
  if (!strcmp(mode, "selffuse")) start_selffuse();
  if (!strcmp(mode, "wx")) pthread_create(&th, NULL, wx_flipper, (void *)(intptr_t)(writers + 2));
  printf("ready pid=%d base=0x%llx size=%llu threads=%d\n", getpid(),
         (unsigned long long)(uintptr_t)region, (unsigned long long)size, nthreads);
  fflush(stdout);
  // Commands come on fd 3 when it is open: Node closes a child's stdin when that
  // child (our forking parent) exits.
  FILE *ctl = fcntl(3, F_GETFD) >= 0 ? fdopen(3, "r") : stdin;
  char line[64];
  while (fgets(line, sizeof line, ctl)) {
    if (!strncmp(line, "check", 5)) check();
    else if (!strncmp(line, "counts", 6)) counts();
    else if (!strncmp(line, "probe", 5)) probe();
    else if (!strncmp(line, "quit", 4)) break;
  }
  if (ferror(ctl)) die("control read (EINTR after freeze?)");
  _exit(0);
}
