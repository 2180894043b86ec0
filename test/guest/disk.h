// The disk workload of the test guest (included by init.c): RAM and disk must
// agree, which only a snapshot taking both at one instant preserves.
//
// The guest writes records to /dev/vda with O_DIRECT (so each one is on the
// virtual disk when pwrite returns, not in the page cache): record `seq` goes
// to slot seq % DISK_SLOTS. Only after pwrite returned does RAM note `seq` as
// the last completed one. Every tick the guest reads all slots back and checks
// that the disk holds exactly records 1..last, each in its slot, and nothing
// newer. A restore from a disk copied after the RAM holds newer records than
// RAM knows of: "disk=FAIL". A write in flight at the snapshot is re-issued by
// QEMU on restore, so it completes again before the next check.
#define DISK_SLOTS 1024
#define DISK_TAG 0x6267736e61702d64ULL /* "bgsnap-d" */

struct record {
  uint64_t tag, seq, slot, csum;
  uint64_t fill[PAGE_BYTES / 8 - 4];
};

static struct {
  int fd;
  off_t at; // where the slots start on the disk (bgsnap.disk_at=MiB)
  uint64_t last; // last record whose pwrite completed
  struct record *buf; // one page, aligned for O_DIRECT
  struct record *all; // DISK_SLOTS pages, for the check
} dk;

static uint64_t record_csum(const struct record *r) {
  return mix(r->tag ^ mix(r->seq) ^ mix(r->slot + 7) ^ r->fill[0] ^ r->fill[PAGE_BYTES / 8 - 5]);
}

static void load_module(const char *name) {
  char p[128];
  snprintf(p, sizeof p, "/lib/modules/%s.ko", name);
  int fd = open(p, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST) out("bgsnap-guest: %s: %s\n", name, strerror(errno));
  close(fd);
}

// virtio-blk and its transport, and /dev for /dev/vda (also for fs.h).
static int load_disk_modules(void) {
  const char *mods[] = {"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk"};
  for (size_t i = 0; i < sizeof mods / sizeof mods[0]; i++) load_module(mods[i]);
  mkdir("/dev", 0755);
  mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
  return 1;
}

static int disk_setup(long at_mb) {
  dk.at = (off_t)at_mb << 20;
  load_disk_modules();
  for (int i = 0; i < 100 && (dk.fd = open("/dev/vda", O_RDWR | O_DIRECT)) < 0; i++) usleep(50000); // probing is async
  dk.buf = mmap(NULL, PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  dk.all = mmap(NULL, (size_t)DISK_SLOTS * PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (dk.fd < 0 || dk.buf == MAP_FAILED || dk.all == MAP_FAILED) {
    out("bgsnap-guest: no disk: %s\n", strerror(errno));
    return 0;
  }
  // A fresh start: clear the slots so records of an earlier boot do not count.
  memset(dk.all, 0, (size_t)DISK_SLOTS * PAGE_BYTES);
  if (pwrite(dk.fd, dk.all, (size_t)DISK_SLOTS * PAGE_BYTES, dk.at) != (ssize_t)DISK_SLOTS * PAGE_BYTES) out("bgsnap-guest: clearing the disk: %s\n", strerror(errno));
  out("disk ready slots=%d\n", DISK_SLOTS);
  return 1;
}

static void disk_write_next(void) {
  uint64_t seq = dk.last + 1;
  struct record *r = dk.buf;
  r->tag = DISK_TAG;
  r->seq = seq;
  r->slot = seq % DISK_SLOTS;
  for (size_t w = 0; w < PAGE_BYTES / 8 - 4; w++) r->fill[w] = mix(seq * 131 + w);
  r->csum = record_csum(r);
  ssize_t n = pwrite(dk.fd, r, PAGE_BYTES, dk.at + (off_t)r->slot * PAGE_BYTES);
  if (n == PAGE_BYTES) dk.last = seq;
  else out("bgsnap-guest: disk write %llu failed: %s\n", (unsigned long long)seq, n < 0 ? strerror(errno) : "short");
}

// Slot s must hold the newest record k <= last with k % DISK_SLOTS == s (or
// nothing if there is none yet), whole.
static void disk_report(void) {
  uint64_t bad = 0, newer = 0, maxseq = 0;
  if (pread(dk.fd, dk.all, (size_t)DISK_SLOTS * PAGE_BYTES, dk.at) != (ssize_t)DISK_SLOTS * PAGE_BYTES) bad = DISK_SLOTS;
  for (uint64_t s = 0; s < DISK_SLOTS && !bad; s++) {
    const struct record *r = &dk.all[s];
    uint64_t want = dk.last >= s ? dk.last - (dk.last - s) % DISK_SLOTS : 0;
    uint64_t have = r->tag == DISK_TAG && r->csum == record_csum(r) && r->slot == s ? r->seq : 0;
    if (r->tag != 0 && have == 0) bad++;
    if (have > maxseq) maxseq = have;
    if (have > dk.last) newer++;
    else if (have != want) bad++;
  }
  out("disk=%s last=%llu ondisk=%llu newer=%llu bad=%llu\n", bad || newer ? "FAIL" : "ok", (unsigned long long)dk.last,
      (unsigned long long)maxseq, (unsigned long long)newer, (unsigned long long)bad);
}
