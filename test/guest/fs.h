// The filesystem workload of the test guest (included by init.c; bgsnap.fs=1):
// files in an ext4 filesystem on /dev/vda (made on the host with mkfs.ext4;
// the cloud kernel has ext4 built in), written through the page cache and
// fsync, must agree with what RAM knows was completed.
//
// Each step `seq` (RAM notes it in fs.last only once it is durable):
//   * overwrites record file r<seq % FS_RECS> in place (pwrite + fdatasync:
//     the file's blocks never move, so a disk from later holds newer records
//     in the very blocks RAM's inodes point to);
//   * creates n<seq> (1-16 pages, a size that changes allocation, directory
//     and journal every step), fsyncs it and the directory, and deletes
//     n<seq - FS_KEEP>.
// One step a tick, no more: a restored guest goes on with the tick it was
// snapshotted in before its first check, and its steps are deterministic (the
// same names and contents as the source's). With as many steps a tick as time
// allowed, it rewrote every step a disk copied 3 steps later held before it
// first checked that disk, and the check the test needs to fail passed
// (fs=ok newer=0, 2 of ~8 runs). Now it makes at most one step first (the one
// it was in), so such a disk still holds at least 2 steps RAM knows nothing of.
// Every tick, after sync and drop_caches (so what is read comes from the disk,
// not RAM's page cache), the guest checks that each record file holds the
// newest record <= last for its slot and nothing newer, and that the directory
// holds exactly n<last - FS_KEEP + 1> .. n<last>, each whole (its name, its
// length, and a checksum over every word): "fs=ok last=L ondisk=M ...".
// A line "umount" on the console makes it sync, unmount and stop ("fs
// unmounted"), so the host can run e2fsck on a disk no kernel holds.
#define FS_RECS 32
#define FS_KEEP 24
#define FS_TAG 0x6267736e61702d66ULL /* "bgsnap-f" */
#define FS_MAX_PAGES 16

static struct {
  int on;
  int stepped; // this tick
  uint64_t last;
  uint64_t *buf; // FS_MAX_PAGES pages
} fsw;

static void fs_fill(uint64_t seq, uint64_t kind, size_t words) {
  fsw.buf[0] = FS_TAG ^ kind;
  fsw.buf[1] = seq;
  fsw.buf[2] = words;
  uint64_t s = mix(seq ^ (kind << 40));
  for (size_t w = 4; w < words; w++) fsw.buf[w] = mix(seq * 977 + w + kind);
  for (size_t w = 4; w < words; w++) s = (s ^ fsw.buf[w]) * 0x100000001b3ULL;
  fsw.buf[3] = s;
}

// 0: whole, else the seq it claims is kept in *seq.
static int fs_whole(uint64_t kind, size_t words, uint64_t *seq) {
  *seq = fsw.buf[1];
  if (fsw.buf[0] != (FS_TAG ^ kind) || fsw.buf[2] != words) return 0;
  uint64_t s = mix(fsw.buf[1] ^ (kind << 40));
  for (size_t w = 4; w < words; w++) s = (s ^ fsw.buf[w]) * 0x100000001b3ULL;
  return s == fsw.buf[3];
}

static size_t fs_pages(uint64_t seq) { return 1 + (size_t)(mix(seq) % FS_MAX_PAGES); }

static int fs_put(const char *name, int flags, size_t bytes, int datasync) {
  int fd = open(name, O_WRONLY | O_CLOEXEC | flags, 0644);
  if (fd < 0) return -1;
  int ok = pwrite(fd, fsw.buf, bytes, 0) == (ssize_t)bytes && (datasync ? fdatasync(fd) : fsync(fd)) == 0;
  close(fd);
  return ok ? 0 : -1;
}

static int fs_setup(void) {
  fsw.buf = mmap(NULL, FS_MAX_PAGES * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  mkdir("/proc", 0555);
  mount("proc", "/proc", "proc", 0, NULL);
  mkdir("/mnt", 0755);
  int r = -1;
  for (int i = 0; i < 100 && (r = mount("/dev/vda", "/mnt", "ext4", 0, NULL)) != 0; i++) usleep(50000);
  if (r != 0 || fsw.buf == MAP_FAILED || chdir("/mnt") != 0) {
    out("bgsnap-guest: no filesystem: %s\n", strerror(errno));
    return 0;
  }
  // A fresh start: every record file exists, empty of records.
  memset(fsw.buf, 0, PAGE_BYTES);
  char name[32];
  for (int k = 0; k < FS_RECS; k++) {
    snprintf(name, sizeof name, "r%d", k);
    if (fs_put(name, O_CREAT | O_TRUNC, PAGE_BYTES, 0) != 0) out("bgsnap-guest: %s: %s\n", name, strerror(errno));
  }
  int dir = open(".", O_RDONLY | O_DIRECTORY);
  if (dir >= 0) fsync(dir), close(dir);
  out("fs ready recs=%d keep=%d\n", FS_RECS, FS_KEEP);
  return 1;
}

static void fs_write_next(void) {
  if (fsw.stepped) return;
  fsw.stepped = 1;
  uint64_t seq = fsw.last + 1;
  char name[32];
  fs_fill(seq, 1, PAGE_BYTES / 8);
  snprintf(name, sizeof name, "r%llu", (unsigned long long)(seq % FS_RECS));
  int bad = fs_put(name, 0, PAGE_BYTES, 1);
  size_t bytes = fs_pages(seq) * PAGE_BYTES;
  fs_fill(seq, 2, bytes / 8);
  snprintf(name, sizeof name, "n%llu", (unsigned long long)seq);
  bad |= fs_put(name, O_CREAT | O_TRUNC, bytes, 0);
  if (seq > FS_KEEP) {
    snprintf(name, sizeof name, "n%llu", (unsigned long long)(seq - FS_KEEP));
    if (unlink(name) != 0 && errno != ENOENT) bad = 1;
  }
  int dir = open(".", O_RDONLY | O_DIRECTORY);
  bad |= dir < 0 || fsync(dir) != 0;
  if (dir >= 0) close(dir);
  if (!bad) fsw.last = seq;
  else out("bgsnap-guest: fs step %llu failed: %s\n", (unsigned long long)seq, strerror(errno));
}

static int fs_read(const char *name, size_t max, size_t *got) {
  int fd = open(name, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = pread(fd, fsw.buf, max, 0);
  close(fd);
  *got = n > 0 ? (size_t)n : 0;
  return n < 0 ? -1 : 0;
}

// Record files: slot k holds the newest record <= last with seq % FS_RECS == k.
static void fs_check_recs(uint64_t *bad, uint64_t *newer, uint64_t *maxseq) {
  char name[32];
  for (uint64_t k = 0; k < FS_RECS; k++) {
    size_t got;
    uint64_t seq, want = fsw.last >= k ? fsw.last - (fsw.last - k) % FS_RECS : 0;
    snprintf(name, sizeof name, "r%llu", (unsigned long long)k);
    if (fs_read(name, PAGE_BYTES, &got) != 0 || got != PAGE_BYTES) { (*bad)++; continue; }
    int whole = fs_whole(1, PAGE_BYTES / 8, &seq);
    if (!whole) seq = fsw.buf[0] == 0 && fsw.buf[1] == 0 ? 0 : (uint64_t)-1;
    if (seq == (uint64_t)-1) { (*bad)++; continue; }
    if (seq > *maxseq) *maxseq = seq;
    if (seq > fsw.last) (*newer)++;
    else if (seq != want) (*bad)++;
  }
}

// Churn files: exactly n<last-FS_KEEP+1> .. n<last>, each whole.
static void fs_check_churn(uint64_t *bad, uint64_t *newer, uint64_t *maxseq) {
  uint64_t first = fsw.last > FS_KEEP ? fsw.last - FS_KEEP + 1 : 1, count = 0, later = 0;
  char name[32];
  for (uint64_t s = first; s <= fsw.last; s++) {
    size_t got, words = fs_pages(s) * PAGE_BYTES / 8;
    uint64_t seq;
    snprintf(name, sizeof name, "n%llu", (unsigned long long)s);
    if (fs_read(name, FS_MAX_PAGES * PAGE_BYTES, &got) != 0 || got != words * 8 || !fs_whole(2, words, &seq) || seq != s) (*bad)++;
  }
  DIR *d = opendir(".");
  for (struct dirent *e; d && (e = readdir(d)) != NULL;) {
    if (e->d_name[0] != 'n') continue;
    uint64_t s = strtoull(e->d_name + 1, NULL, 10);
    count++;
    if (s > *maxseq) *maxseq = s;
    if (s > fsw.last) later++;
    else if (s < first) (*bad)++;
  }
  if (d) closedir(d);
  if (!d || count != fsw.last - first + 1 + later) (*bad)++;
  *newer += later;
}

static void fs_drop_caches(void) {
  sync();
  int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
  if (fd >= 0) {
    if (write(fd, "3", 1) != 1) out("bgsnap-guest: drop_caches: %s\n", strerror(errno));
    close(fd);
  }
}

static void fs_report(void) {
  uint64_t bad = 0, newer = 0, maxseq = 0;
  fs_drop_caches();
  fs_check_recs(&bad, &newer, &maxseq);
  fs_check_churn(&bad, &newer, &maxseq);
  fsw.stepped = 0;
  out("fs=%s last=%llu ondisk=%llu newer=%llu bad=%llu\n", bad || newer ? "FAIL" : "ok", (unsigned long long)fsw.last,
      (unsigned long long)maxseq, (unsigned long long)newer, (unsigned long long)bad);
}

// A console line "umount" (the host writes it to the serial port) ends the
// workload with the filesystem cleanly unmounted. A line "mark" is answered
// with "fs mark": checks after it were made after the host typed it, so a
// restored guest's are told from output the snapshot caught still on its way
// out of the serial port, which the restored UART sends first.
static void fs_poll_console(void) {
  struct pollfd p = {.fd = 0, .events = POLLIN};
  char line[64];
  if (poll(&p, 1, 0) != 1 || !(p.revents & POLLIN)) return;
  ssize_t n = read(0, line, sizeof line - 1);
  if (n > 0 && strncmp(line, "mark", 4) == 0) out("fs mark\n");
  if (n <= 0 || strncmp(line, "umount", 6) != 0) return;
  sync();
  if (chdir("/") != 0 || umount("/mnt") != 0) {
    out("fs umount failed: %s\n", strerror(errno));
    return;
  }
  fsw.on = 0;
  out("fs unmounted\n");
}
