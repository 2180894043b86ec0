// Test target for shared memory with holes: a memfd and a MAP_SHARED anonymous
// mapping of SIZE_MIB each, of which only the first 1 MiB of every 8 MiB is
// written (page i of the mapping holds i + 1 in its first word, then a fill).
// A capture must record the holes as zero without reading them: reading a hole
// through the mapping would allocate it in the target's shmem.
//
//   sparse SIZE_MIB     prints "ready pid=P memfd=ADDR shared=ADDR size=N fd=FD"
//
// Forks into the background first (so it is not the test runner's child), then
// sleeps until killed.
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void fill(uint8_t *p, size_t size) {
  for (size_t off = 0; off < size; off += 8u << 20) {
    for (size_t q = off; q < off + (1u << 20) && q < size; q += 4096) {
      memset(p + q, 0x5a, 4096);
      *(uint64_t *)(p + q) = q / 4096 + 1;
    }
  }
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  size_t size = (size_t)atol(argv[1]) << 20;
  if (fork() != 0) _exit(0);
  int fd = memfd_create("bgsnap-sparse", 0);
  if (fd < 0 || ftruncate(fd, (off_t)size) != 0) return 3;
  uint8_t *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  uint8_t *s = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED || s == MAP_FAILED) return 4;
  fill(m, size);
  fill(s, size);
  printf("ready pid=%d memfd=0x%llx shared=0x%llx size=%zu fd=%d\n", getpid(), (unsigned long long)(uintptr_t)m,
         (unsigned long long)(uintptr_t)s, size, fd);
  fflush(stdout);
  for (;;) pause();
}
