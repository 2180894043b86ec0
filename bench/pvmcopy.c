// Baseline for the process capture benchmarks: a plain sequential copy of a
// running process's memory, no freeze, no protection (so not point-in-time).
//   pvmcopy PID ADDR_HEX LENGTH > /dev/null
// Reads [ADDR, ADDR+LENGTH) with process_vm_readv in 4 MiB pieces into one
// pre-faulted buffer and writes each piece to stdout, as a capture would hand
// its pages on. Prints "SECONDS BYTES" on stderr.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PIECE (4u << 20)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: %s PID ADDR_HEX LENGTH\n", argv[0]); return 2; }
  pid_t pid = atoi(argv[1]);
  unsigned long long addr = strtoull(argv[2], NULL, 16), len = strtoull(argv[3], NULL, 10);
  char *buf = mmap(NULL, PIECE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (buf == MAP_FAILED) { perror("mmap"); return 1; }
  double t0 = now();
  unsigned long long done = 0;
  while (done < len) {
    size_t n = len - done < PIECE ? len - done : PIECE;
    struct iovec local = {buf, n}, remote = {(void *)(addr + done), n};
    ssize_t r = process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (r <= 0) { perror("process_vm_readv"); return 1; }
    if (write(1, buf, (size_t)r) != r) { perror("write"); return 1; }
    done += (unsigned long long)r;
  }
  fprintf(stderr, "%.6f %llu\n", now() - t0, done);
  return 0;
}
