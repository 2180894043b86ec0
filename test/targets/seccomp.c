// A target whose seccomp filter acts on userfaultfd(2), the syscall bgsnap
// injects, as systemd's SystemCallFilter= and browser sandboxes do.
// Usage: seccomp kill|trap|errno|notify. It forks: the child is the target and
// prints "ready pid=P base=B size=S"; the parent waits for it and prints
// "exit status=S signal=N" (so a test sees a SIGSYS death). Commands on stdin:
//   count  -> "sigsys=N notes=M"   (SIGSYS handler runs, supervisor notifications)
//   call   -> the target calls userfaultfd itself: "ret=R errno=E sigsys=N notes=M"
// Actions: kill = SECCOMP_RET_KILL_PROCESS, trap = SECCOMP_RET_TRAP (SIGSYS
// handler counts), errno = SECCOMP_RET_ERRNO(EACCES), notify = SECCOMP_RET_USER_NOTIF
// to a supervisor thread that counts and answers EPERM.
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int sigsys, notes;
static volatile uint8_t *region;
static const size_t kLen = 4 << 20;

static void OnSigsys(int sig) { (void)sig; sigsys++; }

static int Install(uint32_t action, int flags) {
  struct sock_filter code[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, action),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof code / sizeof code[0], code};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
  return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

// Answers every notification with EPERM, counting them.
static void *Supervisor(void *arg) {
  int fd = (int)(intptr_t)arg;
  struct seccomp_notif req;
  struct seccomp_notif_resp resp;
  for (;;) {
    memset(&req, 0, sizeof req);
    if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0) continue;
    notes++;
    memset(&resp, 0, sizeof resp);
    resp.id = req.id;
    resp.error = -EPERM;
    ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
  }
  return NULL;
}

static void *Writer(void *arg) {
  (void)arg;
  for (uint8_t gen = 0;; gen++) {
    for (size_t i = 0; i < kLen; i += 4096) region[i] = gen;
    usleep(1000);
  }
  return NULL;
}

static int Setup(const char *mode) {
  signal(SIGSYS, OnSigsys);
  if (!strcmp(mode, "kill")) return Install(SECCOMP_RET_KILL_PROCESS, 0);
  if (!strcmp(mode, "trap")) return Install(SECCOMP_RET_TRAP, 0);
  if (!strcmp(mode, "errno")) return Install(SECCOMP_RET_ERRNO | EACCES, 0);
  if (strcmp(mode, "notify")) return -1;
  int fd = Install(SECCOMP_RET_USER_NOTIF, SECCOMP_FILTER_FLAG_NEW_LISTENER);
  pthread_t t;
  if (fd >= 0) pthread_create(&t, NULL, Supervisor, (void *)(intptr_t)fd);
  return fd < 0 ? -1 : 0;
}

static void Target(const char *mode) {
  region = mmap(NULL, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (Setup(mode) != 0) {
    printf("error seccomp %s: %s\n", mode, strerror(errno));
    _exit(1);
  }
  pthread_t t;
  pthread_create(&t, NULL, Writer, NULL);
  printf("ready pid=%d base=%p size=%zu\n", getpid(), (void *)region, kLen);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "call", 4)) {
      long r = syscall(SYS_userfaultfd, 0);
      int e = r < 0 ? errno : 0;
      usleep(10000);  // let a SIGSYS handler run
      printf("ret=%ld errno=%d sigsys=%d notes=%d\n", r, e, sigsys, notes);
    } else {
      printf("sigsys=%d notes=%d\n", sigsys, notes);
    }
  }
  _exit(0);
}

#include "forked.h"  // main(): fork, run Target(argv[1]), report how it ended
