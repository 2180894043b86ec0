// How the image's layout costs on disk, outside the receiver: writes SIZE MiB
// shaped like the receive bench's image (runs of 4 data pages, every 5th page
// a hole) with one pwrite per run, then fsyncs, and prints the seconds.
//   holes:  as the receiver writes
//   falloc: the same after fallocate() of the whole file (zero pages then
//           occupy disk as unwritten extents)
//   full:   1 MiB writes covering the holes with zeros (fewer, larger writes)
// cc -O2 -o holes-write bench/holes-write.c && ./holes-write MODE FILE SIZE_MIB
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void must(int ok, const char* what) {
  if (!ok) perror(what), exit(1);
}

int main(int argc, char** argv) {
  if (argc != 4) return fprintf(stderr, "usage: %s holes|falloc|full FILE SIZE_MIB\n", argv[0]), 2;
  const char* mode = argv[1];
  size_t size = (size_t)atol(argv[3]) << 20, ps = 4096, pages = size / ps;
  char* src = malloc(1 << 20);
  for (int i = 0; i < (1 << 20); i++) src[i] = (char)(i * 7 + 1);
  double t0 = now();
  int fd = open(argv[2], O_CREAT | O_TRUNC | O_RDWR, 0600);
  must(fd >= 0 && ftruncate(fd, size) == 0, argv[2]);
  if (!strcmp(mode, "falloc")) must(fallocate(fd, 0, 0, size) == 0, "fallocate");
  if (!strcmp(mode, "full")) {
    for (size_t o = 0; o < size; o += 1 << 20) must(pwrite(fd, src, 1 << 20, o) == 1 << 20, "pwrite");
  } else {
    for (size_t p = 0; p < pages;) {
      if (p % 5 == 0 && ++p) continue;
      size_t q = p;
      while (q < pages && q % 5 != 0) q++;
      must(pwrite(fd, src + (p % 200) * ps, (q - p) * ps, p * ps) == (ssize_t)((q - p) * ps), "pwrite");
      p = q;
    }
  }
  must(fsync(fd) == 0, "fsync");
  printf("%-7s %.2f s\n", mode, now() - t0);
  close(fd);
  return 0;
}
