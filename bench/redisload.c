// Closed-loop Redis SET load that records every request's latency, so a
// benchmark can take the percentiles of exactly the requests sent while a
// snapshot ran (redis-benchmark only reports its whole run).
//   redisload SOCKET CONNS SECONDS KEYS VALUE_BYTES > samples
// CONNS connections over a unix socket, one request in flight on each; keys
// "key:%012d" uniformly in [0, KEYS) as redis-benchmark -r names them. Output:
// one binary record per request: u64 start ns (CLOCK_MONOTONIC), u32 latency ns
// (saturated). SECONDS bounds the run; SIGTERM ends it early. Exit 1 on any error reply or connection failure.
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAXC 64

static volatile sig_atomic_t stop;  // SIGTERM: finish the requests in flight, then exit 0
static void on_term(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int dial(const char *path) {
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strncpy(a.sun_path, path, sizeof a.sun_path - 1);
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    perror(path);
    exit(1);
  }
  return fd;
}

// Sends one SET; the reply "+OK\r\n" is 5 bytes, anything else is an error.
static void send_set(int fd, unsigned keys, const char *val, int vlen) {
  char key[32], req[8192];
  int klen = snprintf(key, sizeof key, "key:%012u", (unsigned)(rand() % keys));
  int n = snprintf(req, sizeof req, "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n", klen, key, vlen);
  memcpy(req + n, val, vlen);
  memcpy(req + n + vlen, "\r\n", 2);
  if (write(fd, req, n + vlen + 2) != n + vlen + 2) { perror("write"); exit(1); }
}

int main(int argc, char **argv) {
  if (argc != 6) { fprintf(stderr, "usage: redisload SOCKET CONNS SECONDS KEYS VALUE_BYTES\n"); return 2; }
  int conns = atoi(argv[2]), vlen = atoi(argv[5]);
  unsigned keys = (unsigned)atoi(argv[4]);
  if (conns < 1 || conns > MAXC || vlen < 1 || vlen > 4000 || keys < 1) return 2;
  uint64_t until = now_ns() + (uint64_t)(atof(argv[3]) * 1e9);
  char *val = malloc(vlen);
  memset(val, 'v', vlen);
  struct pollfd p[MAXC];
  uint64_t sent[MAXC];
  int got[MAXC];
  for (int i = 0; i < conns; i++) {
    p[i] = (struct pollfd){.fd = dial(argv[1]), .events = POLLIN};
    sent[i] = now_ns();
    got[i] = 0;
    send_set(p[i].fd, keys, val, vlen);
  }
  signal(SIGTERM, on_term);
  int live = conns;
  while (live > 0) {
    if (poll(p, conns, 1000) < 0) {
      if (errno == EINTR) continue;
      perror("poll");
      return 1;
    }
    for (int i = 0; i < conns; i++) {
      if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[64];
      ssize_t r = read(p[i].fd, buf + got[i], sizeof buf - got[i]);
      if (r <= 0) { fprintf(stderr, "redisload: connection %d closed\n", i); return 1; }
      got[i] += r;
      if (got[i] < 5) continue;
      if (got[i] != 5 || memcmp(buf, "+OK\r\n", 5)) { fprintf(stderr, "redisload: reply %.*s\n", got[i], buf); return 1; }
      uint64_t t = now_ns(), lat = t - sent[i];
      struct { uint64_t start; uint32_t lat; } __attribute__((packed)) rec = {sent[i], lat > UINT32_MAX ? UINT32_MAX : (uint32_t)lat};
      fwrite(&rec, sizeof rec, 1, stdout);
      got[i] = 0;
      if (t >= until || stop) { close(p[i].fd); p[i].fd = -1; live--; continue; }
      sent[i] = t;
      send_set(p[i].fd, keys, val, vlen);
    }
  }
  return 0;
}
