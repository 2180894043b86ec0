// Test target for snapshot chains: between snapshots the test tells it to take
// a step, and each step writes a known set of pages (and maps, unmaps, remaps
// or drops memory), so each generation of a chain must hold exactly that.
//
//   chain x          (the argument is unused; forked.h wants one)
//
// Layout: one PROT_NONE reservation holds `region` (256 pages), `extra` (16
// pages, mapped in step 3, unmapped in step 4) and `movable` (32 pages), each
// between PROT_NONE gaps so the kernel never merges them into one mapping.
// Every 8-byte word of a page holds gen * 1000000 + page * 1000 + word.
//
//   step 2: region pages i % 4 == 0 rewritten              (64 pages)
//   step 3: region pages i % 8 == 1 (32); extra mapped and written (16)
//   step 4: region pages i % 16 == 2 (16); extra unmapped; movable grown to
//           64 pages with mremap (it cannot grow in place: it moves)
//   step 5: region pages 0..7 (8); region pages 128..191 dropped (MADV_DONTNEED)
//   step 6: `thp` mapped (4 MiB, 2 MiB aligned, MADV_HUGEPAGE) and written whole
//           (1024 pages), so it is backed by two transparent huge pages
//   step 7: its first huge page dropped (MADV_DONTNEED), then its pages 0..2
//           written again (3); the rest of that 2 MiB reads as zero
//   step 8: its second huge page dropped, nothing written: 512 pages now zero
//
// A second thread sleeps in idle_thread, so a core has two threads. Commands
// on stdin: "step K" prints "stepped K movable=0x..."; EOF exits.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define REGION 256
volatile long generation = 1;
uint8_t *region, *extra, *movable, *thp;

static void stamp(uint8_t *p, long gen, long page) {
  uint64_t *w = (uint64_t *)p;
  for (int k = 0; k < PAGE / 8; k++) w[k] = gen * 1000000 + page * 1000 + k;
}

static void *idle_thread(void *arg) {
  (void)arg;
  for (;;) pause();
  return NULL;
}

static void step(long k) {
  for (long i = 0; i < REGION; i++) {
    int hit = (k == 2 && i % 4 == 0) || (k == 3 && i % 8 == 1) || (k == 4 && i % 16 == 2) || (k == 5 && i < 8);
    if (hit) stamp(region + i * PAGE, k, i);
  }
  if (k == 3) {
    mprotect(extra, 16 * PAGE, PROT_READ | PROT_WRITE);
    for (long i = 0; i < 16; i++) stamp(extra + i * PAGE, k, 1000 + i);
  }
  if (k == 4) {
    munmap(extra, 16 * PAGE);
    void *m = mremap(movable, 32 * PAGE, 64 * PAGE, MREMAP_MAYMOVE);
    if (m == MAP_FAILED) _exit(4);
    movable = m;
  }
  if (k == 5) madvise(region + 128 * PAGE, 64 * PAGE, MADV_DONTNEED);
  if (k == 6) {
    uint8_t *m = mmap(NULL, 6 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) _exit(6);
    thp = (uint8_t *)(((uintptr_t)m + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
    if (thp > m) munmap(m, thp - m);  // keep exactly the aligned 4 MiB
    munmap(thp + (4 << 20), m + (6 << 20) - (thp + (4 << 20)));
    madvise(thp, 4 << 20, MADV_HUGEPAGE);
    for (long i = 0; i < 1024; i++) stamp(thp + i * PAGE, k, 3000 + i);
  }
  if (k == 7) {
    madvise(thp, 2 << 20, MADV_DONTNEED);
    for (long i = 0; i < 3; i++) stamp(thp + i * PAGE, k, 3000 + i);
  }
  if (k == 8) madvise(thp + (2 << 20), 2 << 20, MADV_DONTNEED);
  generation = k;
}

static void Target(const char *mode) {
  (void)mode;
  uint8_t *res = mmap(NULL, 400 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (res == MAP_FAILED) _exit(2);
  region = res + 16 * PAGE;
  extra = res + 288 * PAGE;  // PROT_NONE until step 3
  movable = res + 320 * PAGE;
  mprotect(region, REGION * PAGE, PROT_READ | PROT_WRITE);
  mprotect(movable, 32 * PAGE, PROT_READ | PROT_WRITE);
  for (long i = 0; i < REGION; i++) stamp(region + i * PAGE, 1, i);
  for (long i = 0; i < 32; i++) stamp(movable + i * PAGE, 1, 2000 + i);
  pthread_t t;
  pthread_create(&t, NULL, idle_thread, NULL);
  printf("ready pid=%d region=%p\n", getpid(), (void *)region);
  fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    long k;
    if (sscanf(line, "step %ld", &k) != 1) continue;
    step(k);
    printf("stepped %ld movable=%p thp=%p\n", k, (void *)movable, (void *)thp);
    fflush(stdout);
  }
  _exit(0);
}

#include "forked.h"  // main(): fork, run Target(argv[1]), report how it ended
