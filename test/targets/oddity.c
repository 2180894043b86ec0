// Targets that bgsnap must refuse, or capture while reporting what it cannot see.
// Usage: oddity MODE. It forks: the child is the target (not the test's own child,
// so the test process's waitpid never sees its ptrace stops) and prints
// "ready pid=P ..."; the parent waits for it and prints "exit status=S signal=N".
// The target keeps writing its memory until stdin closes, then exits.
// Modes:
//   nondumpable  prctl(PR_SET_DUMPABLE, 0), as ssh-agent and gpg-agent do
//   memfd        a memfd both mapped and open; written through write(2) as well
//   iouring      an io_uring with registered (pinned) buffers, by raw syscalls,
//                and its own binary open with O_DIRECT
//   shadow       16 TiB PROT_NONE NORESERVE (an ASan-like shadow gap)
//   shadow-rw    16 TiB writable NORESERVE, a few pages touched
//   hugetlb1g    one 1 GiB hugetlb page
//   hugetlb2m    8 MiB of 2 MiB hugetlb pages
//   devzero      a private /dev/zero mapping of 64 MiB, its first 1 MiB touched
//   perf         128 MiB of perf_event rings (VM_IO | VM_PFNMAP), mapped writable
//   zombie       the main thread calls pthread_exit while another thread runs
//   vfork        the main thread is a parent stopped in vfork
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/perf_event.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif

static volatile uint8_t *region;
static size_t regionLen = 1 << 20;
static int memfd = -1;

static void die(const char *what) {
  printf("error %s: %s\n", what, strerror(errno));
  fflush(stdout);
  _exit(1);
}

static void *Map(size_t len, int prot, int flags, int fd) {
  void *p = mmap(NULL, len, prot, flags, fd, 0);
  if (p == MAP_FAILED) die("mmap");
  return p;
}

// Write the region, and for memfd also through write(2), until stdin closes.
static void *Writer(void *arg) {
  (void)arg;
  for (uint64_t gen = 0;; gen++) {
    for (size_t i = 0; i < regionLen; i += 4096) region[i] = (uint8_t)gen;
    if (memfd >= 0 && pwrite(memfd, &gen, sizeof gen, 8192) != sizeof gen) die("pwrite");
    usleep(2000);
  }
  return NULL;
}

static void WaitStdin(void) {
  char buf[64];
  while (read(0, buf, sizeof buf) > 0) {}
}

static void SetupIoUring(void) {
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  int fd = (int)syscall(__NR_io_uring_setup, 8, &p);
  if (fd < 0) die("io_uring_setup");
  struct iovec iov = {(void *)region, regionLen};
  if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_BUFFERS, &iov, 1) != 0) die("IORING_REGISTER_BUFFERS");
}

// Two rings of 64 MiB of data each (a power of two of pages) plus a control page.
static void SetupPerf(void) {
  struct perf_event_attr a;
  memset(&a, 0, sizeof a);
  a.size = sizeof a;
  a.type = PERF_TYPE_SOFTWARE;
  a.config = PERF_COUNT_SW_DUMMY;
  a.disabled = 1;
  for (int i = 0; i < 2; i++) {
    int fd = (int)syscall(__NR_perf_event_open, &a, 0, -1, -1, 0);
    if (fd < 0) die("perf_event_open");
    Map((1 + 16384) * 4096ul, PROT_READ | PROT_WRITE, MAP_SHARED, fd);
  }
}

static int Setup(const char *mode) {
  const int anon = MAP_PRIVATE | MAP_ANONYMOUS;
  region = Map(regionLen, PROT_READ | PROT_WRITE, anon, -1);
  if (!strcmp(mode, "nondumpable")) {
    if (prctl(PR_SET_DUMPABLE, 0) != 0) die("prctl");
  } else if (!strcmp(mode, "memfd")) {
    if ((memfd = memfd_create("oddity-memfd", 0)) < 0 || ftruncate(memfd, regionLen) != 0) die("memfd");
    region = Map(regionLen, PROT_READ | PROT_WRITE, MAP_SHARED, memfd);
  } else if (!strcmp(mode, "iouring")) {
    SetupIoUring();
    if (open("/proc/self/exe", O_RDONLY | O_DIRECT) < 0) die("O_DIRECT open");
  } else if (!strcmp(mode, "shadow") || !strcmp(mode, "shadow-rw")) {
    int rw = !strcmp(mode, "shadow-rw");
    uint8_t *s = Map(16ull << 40, rw ? PROT_READ | PROT_WRITE : PROT_NONE, anon | MAP_NORESERVE, -1);
    if (rw) for (int i = 0; i < 4; i++) s[(uint64_t)i << 38] = 1;
  } else if (!strcmp(mode, "hugetlb1g")) {
    region = Map(1ul << 30, PROT_READ | PROT_WRITE, anon | MAP_HUGETLB | (30 << MAP_HUGE_SHIFT), -1);
  } else if (!strcmp(mode, "hugetlb2m")) {
    region = Map(regionLen = 8 << 20, PROT_READ | PROT_WRITE, anon | MAP_HUGETLB | (21 << MAP_HUGE_SHIFT), -1);
  } else if (!strcmp(mode, "devzero")) {
    int fd = open("/dev/zero", O_RDWR);
    if (fd < 0) die("open /dev/zero");
    region = Map(64 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd);
    close(fd);
  } else if (!strcmp(mode, "perf")) {
    SetupPerf();
  } else if (strcmp(mode, "zombie") && strcmp(mode, "vfork")) {
    printf("error unknown mode %s\n", mode);
    return -1;
  }
  return 0;
}

static void *ZombieWorker(void *arg) {
  (void)arg;
  WaitStdin();
  _exit(0);
}

static void Target(const char *mode) {
  if (Setup(mode) != 0) _exit(2);
  pthread_t t;
  if (!strcmp(mode, "vfork")) {
    pid_t parent = getpid();
    if (vfork() == 0) {  // the child only writes and reads, then leaves by _exit
      printf("ready pid=%d vforkchild=%d\n", parent, getpid());
      fflush(stdout);
      WaitStdin();
      _exit(0);
    }
    _exit(0);
  }
  pthread_create(&t, NULL, Writer, NULL);
  printf("ready pid=%d base=%p size=%zu\n", getpid(), (void *)region, regionLen);
  fflush(stdout);
  if (!strcmp(mode, "zombie")) {
    pthread_create(&t, NULL, ZombieWorker, NULL);
    pthread_exit(NULL);
  }
  WaitStdin();
  _exit(0);
}

#include "forked.h"  // main(): fork, run Target(argv[1]), report how it ended
