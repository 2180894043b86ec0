// /init of the bgsnap test guest: a busy, self-verifying memory workload.
//
// It keeps a region of pages under an invariant that only a point-in-time copy
// of memory preserves, so a restored snapshot proves itself consistent:
//   * every page carries a share ("value") of a conserved total; a transfer moves
//     an amount from one random page to another, so a torn copy (one page from
//     before a transfer, the other from after) breaks the sum;
//   * every page carries its own index, the generation of its last write and a
//     checksum over all its words, so a stale, misplaced or damaged page fails;
//   * a global generation counter lives outside the region: exactly the two pages
//     of the last transfer carry it, which ties the region to the program state.
// Verification runs between transfers in the only thread, so the invariant holds
// at every check, whatever instant a snapshot was taken at. The tick counter is
// plain guest memory too, so a restored guest continues from the snapshot point.
//
// Kernel command line: bgsnap.mb=N (region size, default 48), bgsnap.tick_ms=N
// (report interval, default 300), bgsnap.rate=N (transfers per second, default
// unlimited), bgsnap.fault=K / bgsnap.fault_at=N (tests of the check itself),
// bgsnap.disk=1 (the disk workload of disk.h: RAM and /dev/vda must agree),
// bgsnap.disk_at=MiB (where on the disk its records go, default 0),
// bgsnap.fs=1 (the filesystem workload of fs.h: files in ext4 on /dev/vda).
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096
#define DATA_WORDS (PAGE_BYTES / 8 - 4)
#define TAG 0x6267736e61702d70ULL /* "bgsnap-p" */
#define INITIAL_SHARE 1000
#define TRANSFERS_PER_CLOCK_CHECK 32

struct page {
  uint64_t tag; /* TAG ^ index: catches pages restored at the wrong place */
  int64_t value;
  uint64_t gen;
  uint64_t csum;
  uint64_t data[DATA_WORDS];
};

struct check {
  int64_t sum;
  uint64_t max_gen, at_gen, bad, first_bad;
};

static struct {
  uint64_t tick, gen, rng, transfers;
  int64_t total;
  size_t npages;
  struct page *pages;
} st;

static void out(const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n > (int)sizeof line - 1) n = sizeof line - 1;
  for (int off = 0; off < n;) {
    ssize_t w = write(1, line + off, n - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    off += w;
  }
}

static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

static uint64_t rnd(void) {
  st.rng ^= st.rng << 13;
  st.rng ^= st.rng >> 7;
  st.rng ^= st.rng << 17;
  return st.rng;
}

static uint64_t page_csum(const struct page *p) {
  uint64_t s = mix(p->tag ^ mix((uint64_t)p->value) ^ mix(p->gen + 1));
  for (size_t w = 0; w < DATA_WORDS; w++) s = (s ^ p->data[w]) * 0x100000001b3ULL;
  return s;
}

// Rewrites the whole page, so the workload dirties memory as fast as it can.
static void write_page(size_t i, int64_t value, uint64_t gen) {
  struct page *p = &st.pages[i];
  uint64_t seed = mix(i * 0x9e3779b97f4a7c15ULL ^ gen ^ ((uint64_t)value << 20));
  p->tag = TAG ^ i;
  p->value = value;
  p->gen = gen;
  for (size_t w = 0; w < DATA_WORDS; w++) p->data[w] = seed + w * 0x2545f4914f6cdd1dULL;
  p->csum = page_csum(p);
}

static void transfer_between(size_t a, size_t b) {
  int64_t amount = 1 + (int64_t)(rnd() % 997);
  uint64_t gen = ++st.gen;
  write_page(a, st.pages[a].value - amount, gen);
  write_page(b, st.pages[b].value + amount, gen);
  st.transfers++;
}

static void transfer(void) {
  size_t a = rnd() % st.npages, b = rnd() % (st.npages - 1);
  transfer_between(a, b >= a ? b + 1 : b);
}

// Test hook proving the check catches what it is for (bgsnap.fault=K at tick
// bgsnap.fault_at): K=1 leaves one page of a transfer as it was before it,
// exactly what a torn (non point-in-time) copy holds; K=2 flips one data bit.
static void inject_fault(long kind) {
  static struct page saved;
  size_t a = rnd() % st.npages, b = (a + 1) % st.npages;
  if (kind == 1) {
    memcpy(&saved, &st.pages[a], sizeof saved);
    transfer_between(a, b);
    memcpy(&st.pages[a], &saved, sizeof saved);
  } else {
    st.pages[a].data[a % DATA_WORDS] ^= 1ULL << (a % 64);
  }
  out("fault %ld injected in page %zu after tick %llu\n", kind, a, (unsigned long long)st.tick);
}

static struct check verify(void) {
  struct check c = {0, 0, 0, 0, 0};
  for (size_t i = 0; i < st.npages; i++) {
    const struct page *p = &st.pages[i];
    int ok = p->tag == (TAG ^ i) && p->gen <= st.gen && p->csum == page_csum(p);
    if (!ok && c.bad++ == 0) c.first_bad = i;
    c.sum += p->value;
    if (p->gen > c.max_gen) c.max_gen = p->gen;
    if (p->gen == st.gen) c.at_gen++;
  }
  return c;
}

static void report(void) {
  struct check c = verify();
  st.tick++;
  // Before the first transfer every page has generation 0, hence npages at gen.
  uint64_t want_at_gen = st.gen ? 2 : st.npages;
  if (c.bad == 0 && c.sum == st.total && c.max_gen == st.gen && c.at_gen == want_at_gen) {
    out("tick %llu gen %llu check=ok\n", (unsigned long long)st.tick, (unsigned long long)st.gen);
    return;
  }
  out("tick %llu gen %llu check=FAIL sum=%lld want=%lld bad=%llu first_bad=%llu max_gen=%llu "
      "at_gen=%llu\n",
      (unsigned long long)st.tick, (unsigned long long)st.gen, (long long)c.sum, (long long)st.total,
      (unsigned long long)c.bad, (unsigned long long)c.first_bad, (unsigned long long)c.max_gen,
      (unsigned long long)c.at_gen);
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

// Dotted parameters are module options to the kernel and never reach init's
// argv or environment, so they are read from /proc/cmdline.
static long cmdline_param(const char *cmdline, const char *name, long fallback) {
  size_t len = strlen(name);
  for (const char *p = cmdline; (p = strstr(p, name)) != NULL; p += len) {
    if ((p == cmdline || p[-1] == ' ') && p[len] == '=') {
      long v = strtol(p + len + 1, NULL, 10);
      return v > 0 ? v : fallback;
    }
  }
  return fallback;
}

static void read_cmdline(char *buf, size_t size) {
  buf[0] = 0;
  mkdir("/proc", 0555);
  if (mount("proc", "/proc", "proc", 0, NULL) != 0) return;
  int fd = open("/proc/cmdline", O_RDONLY);
  if (fd >= 0) {
    ssize_t n = read(fd, buf, size - 1);
    buf[n > 0 ? n : 0] = 0;
    close(fd);
  }
  umount("/proc");
}

// The kernel opens /dev/console for init when the node exists; if the image
// lacks it, devtmpfs provides one.
static void ensure_console(void) {
  if (fcntl(1, F_GETFD) >= 0) return;
  mkdir("/dev", 0755);
  mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
  int fd = open("/dev/console", O_RDWR);
  if (fd < 0) return;
  dup2(fd, 0);
  dup2(fd, 1);
  dup2(fd, 2);
  if (fd > 2) close(fd);
}

#include "disk.h"
#include "fs.h"

static void setup_region(long mb) {
  st.npages = (size_t)mb * 1024 * 1024 / PAGE_BYTES;
  size_t bytes = st.npages * PAGE_BYTES;
  void *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
  if (mem == MAP_FAILED) {
    out("bgsnap-guest: cannot map %ld MiB: %s\n", mb, strerror(errno));
    for (;;) pause();
  }
  st.pages = mem;
  st.rng = 0x853c49e6748fea9bULL ^ now_ms();
  for (size_t i = 0; i < st.npages; i++) write_page(i, INITIAL_SHARE, 0);
  st.total = (int64_t)st.npages * INITIAL_SHARE;
}

int main(void) {
  char cmdline[4096];
  ensure_console();
  read_cmdline(cmdline, sizeof cmdline);
  long mb = cmdline_param(cmdline, "bgsnap.mb", 48);
  uint64_t tick_ms = (uint64_t)cmdline_param(cmdline, "bgsnap.tick_ms", 300);
  setup_region(mb);
  // Kernel chatter on the same console could split a tick line; keep only
  // critical messages from here on.
  klogctl(8, NULL, 2);
  out("ready pages=%zu mb=%ld tick_ms=%llu\n", st.npages, mb, (unsigned long long)tick_ms);
  long disk_at = cmdline_param(cmdline, "bgsnap.disk_at", 0);
  int disk = cmdline_param(cmdline, "bgsnap.disk", 0) ? disk_setup(disk_at) : 0;
  if (cmdline_param(cmdline, "bgsnap.fs", 0)) fsw.on = load_disk_modules() && fs_setup();
  long fault = cmdline_param(cmdline, "bgsnap.fault", 0);
  uint64_t fault_at = (uint64_t)cmdline_param(cmdline, "bgsnap.fault_at", 3);
  // bgsnap.rate caps transfers per second (0: as fast as possible). Ordinary
  // precopy only converges when the guest dirties memory slower than QEMU sends.
  uint64_t budget = (uint64_t)cmdline_param(cmdline, "bgsnap.rate", 0) * tick_ms / 1000;
  uint64_t next = now_ms() + tick_ms, done_this_tick = 0;
  for (;;) {
    if (!budget || done_this_tick < budget) {
      for (int k = 0; k < TRANSFERS_PER_CLOCK_CHECK; k++) transfer();
      done_this_tick += TRANSFERS_PER_CLOCK_CHECK;
      if (disk) disk_write_next();
      if (fsw.on) fs_write_next();
    } else {
      usleep(1000);
    }
    uint64_t now = now_ms();
    if (now < next) continue;
    if (fault && st.tick == fault_at) inject_fault(fault);
    report();
    if (disk) disk_report();
    if (fsw.on) fs_report(), fs_poll_console();
    done_this_tick = 0;
    // After a long pause (snapshot restore, slow host) do not burst ticks.
    next = (next + tick_ms > now) ? next + tick_ms : now + tick_ms;
  }
}
