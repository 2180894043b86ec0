// The "selffuse" mode of the invariant target: a file the target serves itself
// through FUSE (root only: it mounts with mount(2) on /dev/fuse, no libfuse),
// mapped private and writable, most pages never read. Reading such a page
// sends a FUSE READ to the target's own server thread; while the target is
// frozen nobody answers. Pages read as {0x5346, page number}, as selfuffd's.
// The mount is detached at once: the mapping keeps the connection alive, and
// nothing is left mounted when the target dies.
#include <linux/fuse.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>

static int fuse_fd;

static void fuse_reply(uint64_t unique, int error, const void *body, size_t len) {
  struct fuse_out_header h = {sizeof h + (error ? 0 : len), error, unique};
  struct iovec iov[2] = {{&h, sizeof h}, {(void *)body, error ? 0 : len}};
  if (writev(fuse_fd, iov, 2) < 0 && errno != ENOENT) die("fuse reply");  // ENOENT: interrupted
}

static void fuse_attr(uint64_t node, struct fuse_attr *a) {
  memset(a, 0, sizeof *a);
  a->ino = node;
  a->mode = node == 1 ? S_IFDIR | 0755 : S_IFREG | 0644;
  a->nlink = 1;
  a->size = node == 1 ? 0 : SELF_PAGES * PAGE;
  a->blksize = PAGE;
}

static void fuse_read(struct fuse_in_header *in, struct fuse_read_in *r) {
  static uint8_t buf[1 << 17];
  size_t size = r->size < sizeof buf ? r->size : sizeof buf;
  if (r->offset >= SELF_PAGES * PAGE) size = 0;
  else if (r->offset + size > SELF_PAGES * PAGE) size = SELF_PAGES * PAGE - r->offset;
  memset(buf, 0, size);
  for (size_t o = 0; o < size; o += PAGE) {
    ((uint64_t *)(buf + o))[0] = 0x5346;
    ((uint64_t *)(buf + o))[1] = (r->offset + o) / PAGE;
  }
  fuse_reply(in->unique, 0, buf, size);
}

static void fuse_serve_one(struct fuse_in_header *in, void *arg) {
  union { struct fuse_init_out init; struct fuse_entry_out entry; struct fuse_attr_out attr; struct fuse_open_out open; } o;
  memset(&o, 0, sizeof o);
  switch (in->opcode) {
    case FUSE_INIT:
      o.init.major = FUSE_KERNEL_VERSION;
      o.init.minor = FUSE_KERNEL_MINOR_VERSION;
      o.init.max_readahead = 0;
      o.init.max_write = PAGE;
      return fuse_reply(in->unique, 0, &o.init, sizeof o.init);
    case FUSE_LOOKUP:
      if (in->nodeid != 1 || strcmp(arg, "file")) return fuse_reply(in->unique, -ENOENT, NULL, 0);
      o.entry.nodeid = 2;
      o.entry.entry_valid = o.entry.attr_valid = 3600;
      fuse_attr(2, &o.entry.attr);
      return fuse_reply(in->unique, 0, &o.entry, sizeof o.entry);
    case FUSE_GETATTR:
      o.attr.attr_valid = 3600;
      fuse_attr(in->nodeid, &o.attr.attr);
      return fuse_reply(in->unique, 0, &o.attr, sizeof o.attr);
    case FUSE_OPEN: case FUSE_OPENDIR:
      o.open.fh = 1;
      return fuse_reply(in->unique, 0, &o.open, sizeof o.open);
    case FUSE_READ: return fuse_read(in, arg);
    case FUSE_FLUSH: case FUSE_RELEASE: case FUSE_RELEASEDIR: return fuse_reply(in->unique, 0, NULL, 0);
    case FUSE_FORGET: case FUSE_BATCH_FORGET: case FUSE_INTERRUPT: return;  // no reply
    default: return fuse_reply(in->unique, -ENOSYS, NULL, 0);
  }
}

static void *fuse_server(void *unused) {
  static uint8_t buf[(1 << 17) + 4096];
  for (;;) {
    ssize_t n = read(fuse_fd, buf, sizeof buf);
    if (n < 0 && errno == ENODEV) return NULL;  // unmounted and released
    if (n < 0 && errno == EINTR) die("fuse read (EINTR after freeze?)");
    if (n < (ssize_t)sizeof(struct fuse_in_header)) continue;
    fuse_serve_one((struct fuse_in_header *)buf, buf + sizeof(struct fuse_in_header));
  }
}

static void start_selffuse(void) {
  char dir[] = "/tmp/bgsnap-selffuse-XXXXXX", opts[128], file[64];
  if (!mkdtemp(dir)) die("mkdtemp fuse");
  fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fuse_fd < 0) die("open /dev/fuse");
  snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0", fuse_fd);
  if (mount("bgsnap-self", dir, "fuse.bgsnap-self", MS_NOSUID | MS_NODEV, opts) != 0) die("mount fuse");
  pthread_t th;
  pthread_create(&th, NULL, fuse_server, NULL);
  snprintf(file, sizeof file, "%s/file", dir);
  int fd = open(file, O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("open fuse file");
  self_area = mmap(NULL, SELF_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (self_area == MAP_FAILED) die("mmap fuse file");
  close(fd);
  for (int p = 0; p < 8; p++) (void)*(volatile uint8_t *)(self_area + p * PAGE);  // read; the rest never are
  if (umount2(dir, MNT_DETACH) != 0 || rmdir(dir) != 0) die("detach fuse mount");
}
