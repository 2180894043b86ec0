// Test target for KSM: a MADV_MERGEABLE region whose pages are, at any time,
// mostly identical to many others (so ksmd merges them), rewritten in sweeps.
//
//   ksm SIZE_MIB SWEEP_MS
//
// Every page of the region holds one value in all its 512 words: the number of
// the sweep that last wrote it. A sweep writes pages 0..N-1 in order with the
// next number, taking SWEEP_MS. So at any instant the region reads
// [v, v, ..., v, (page being written), v-1, ..., v-1]: a snapshot that is one
// point in time has that shape; a page saved after a later write breaks it.
// Prints "ready pid=P base=0x... size=S" and runs until killed.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static volatile uint64_t *region;
static size_t npages;
static long sweep_ms;

static void *sweeper(void *arg) {
  (void)arg;
  struct timespec ts = {0, 0};
  size_t step = 64;  // pages per pause
  long pause_ns = sweep_ms * 1000000L / (long)(npages / step);
  ts.tv_sec = pause_ns / 1000000000L;
  ts.tv_nsec = pause_ns % 1000000000L;
  for (uint64_t v = 2;; v++) {
    for (size_t p = 0; p < npages; p++) {
      volatile uint64_t *w = region + p * (PAGE / 8);
      for (int k = 0; k < PAGE / 8; k++) w[k] = v;
      if (p % step == step - 1) nanosleep(&ts, NULL);
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s SIZE_MIB SWEEP_MS\n", argv[0]); return 2; }
  size_t size = (size_t)atol(argv[1]) << 20;
  sweep_ms = atol(argv[2]);
  npages = size / PAGE;
  pid_t child = fork();
  if (child < 0) return 3;
  if (child > 0) _exit(0);
  region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) { perror("mmap"); return 3; }
  if (madvise((void *)region, size, MADV_NOHUGEPAGE) != 0) { perror("madvise(NOHUGEPAGE)"); return 3; }
  if (madvise((void *)region, size, MADV_MERGEABLE) != 0) { perror("madvise(MERGEABLE)"); return 3; }
  for (size_t i = 0; i < size / 8; i++) region[i] = 1;
  pthread_t th;
  pthread_create(&th, NULL, sweeper, NULL);
  printf("ready pid=%d base=0x%llx size=%llu\n", getpid(), (unsigned long long)(uintptr_t)region,
         (unsigned long long)size);
  fflush(stdout);
  for (;;) pause();
}
