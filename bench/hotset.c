// Workload for bench/chain-cost.ts: MIB MiB of private anonymous memory, all
// written once, then one thread rewrites random pages of the first HOT percent
// of it, flat out, for good. Each interval of a chain then dirties at most
// the hot set, while a full snapshot has all MIB to store.
//   hotset MIB HOT_PERCENT        prints "ready pid=P" once the memory is filled
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
static uint8_t *mem;
static size_t pages, hot;

static void *writer(void *arg) {
  (void)arg;
  uint64_t x = 88172645463325252ull, n = 0;
  for (;;) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    uint64_t *w = (uint64_t *)(mem + (x % hot) * PAGE);
    w[(x >> 32) % (PAGE / 8)] = ++n;
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  pages = (size_t)atol(argv[1]) << 8;
  hot = pages * (size_t)atol(argv[2]) / 100;
  if (hot == 0) hot = 1;
  mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 3;
  for (size_t i = 0; i < pages; i++) ((uint64_t *)(mem + i * PAGE))[0] = i + 1;
  pthread_t t;
  pthread_create(&t, NULL, writer, NULL);
  printf("ready pid=%d\n", getpid());
  fflush(stdout);
  pause();
  return 0;
}
