// Test target for the saver's page checksums: a private anonymous region whose
// pages alternate, in fours, between never touched (a zero record, not read),
// written and then zeroed again (read, found zero: the data after it in the
// same read moves down in the batch, with its checksum) and two data pages. A
// writer thread keeps writing the data pages, so the fault path saves pages
// too, 64 KiB of that mix at a time.
//
//   zeromix SIZE_MIB     prints "ready pid=P base=ADDR size=N"
//
// Forks into the background first (so it is not the test runner's child), then
// writes until killed.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint8_t *region;
static size_t pages;

static void *writer(void *arg) {
  (void)arg;
  uint64_t x = 88172645463325252ull, n = 0;
  for (;;) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;  // xorshift: any data page
    size_t p = (x % (pages / 4)) * 4 + 2 + (x >> 40) % 2;
    n++;
    *(volatile uint64_t *)(region + p * 4096 + 8 * (1 + n % 500)) = n;
    if (n % 64 == 0) usleep(50);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  size_t size = (size_t)atol(argv[1]) << 20;
  if (fork() != 0) _exit(0);
  region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) return 3;
  madvise(region, size, MADV_NOHUGEPAGE);  // 4 KiB pages, so untouched ones stay holes
  pages = size / 4096;
  for (size_t p = 0; p < pages; p++) {
    uint8_t *q = region + p * 4096;
    if (p % 4 == 0) continue;
    memset(q, (int)(p % 251) + 1, 4096);
    if (p % 4 == 1) memset(q, 0, 4096);
  }
  pthread_t t;
  if (pthread_create(&t, NULL, writer, NULL) != 0) return 4;
  printf("ready pid=%d base=0x%llx size=%zu\n", getpid(), (unsigned long long)(uintptr_t)region, size);
  fflush(stdout);
  for (;;) pause();
}
