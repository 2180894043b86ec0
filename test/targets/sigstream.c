// A single-threaded target under a steady stream of queued real-time signals,
// each carrying a sequence number as its payload (sigqueue si_value), from a
// sender process of its own. The handler counts every payload; "check" on fd 3
// stops the sender and answers "check sent=N got=M missing=X dup=Y bad=Z":
// "sent" answers "sent=N" while the stream goes on, so a test can capture until
// enough signals were in flight whatever the machine's speed. In "check",
// every payload must arrive exactly once (missing=0 dup=0), and none may come
// without the sender's payload or identity (bad=0: a re-sent or invented one).
// Between signals it spins and sleeps, so a freeze finds it in user space, in a
// restartable nanosleep, or taking a signal. argv[1]: microseconds between sends.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXSEQ (1 << 22)
struct shared { volatile int stop; volatile long sent; };
static struct shared *sh;
static unsigned char *seen;
static volatile long got, bad;
static pid_t sender;

static void on_signal(int sig, siginfo_t *si, void *uc) {
  (void)sig; (void)uc;
  long v = si->si_value.sival_int;
  got++;
  if (si->si_code != SI_QUEUE || si->si_pid != sender || v < 0 || v >= MAXSEQ) {
    bad++;  // say what came instead (async-signal-safe enough for a test target)
    char msg[96];
    int n = snprintf(msg, sizeof msg, "sigstream: bad signal code=%d pid=%d value=%ld\n", si->si_code, si->si_pid, v);
    if (write(2, msg, n) < 0) {}
    return;
  }
  if (seen[v] < 255) seen[v]++;
}

static void send_stream(pid_t target, long gap_us) {
  struct timespec gap = {0, gap_us * 1000};
  for (long seq = 0; !sh->stop && seq < MAXSEQ;) {
    union sigval v = {.sival_int = (int)seq};
    if (sigqueue(target, SIGRTMIN + 1, v) == 0) sh->sent = ++seq;
    else if (errno != EAGAIN) _exit(1);
    nanosleep(&gap, NULL);
  }
  _exit(0);
}

static void check(void) {
  sh->stop = 1;
  waitpid(sender, NULL, 0);
  for (int i = 0; i < 2000 && got < sh->sent + bad; i++) usleep(1000);
  long missing = 0, dup = 0;
  for (long i = 0; i < sh->sent; i++) {
    if (seen[i] == 0) missing++;
    if (seen[i] > 1) dup++;
  }
  printf("check sent=%ld got=%ld missing=%ld dup=%ld bad=%ld\n", sh->sent, got, missing, dup, bad);
  fflush(stdout);
}

int main(int argc, char **argv) {
  long gap_us = argc > 1 ? atol(argv[1]) : 500;
  pid_t child = fork();  // into the background: not the test runner's child
  if (child < 0) return 1;
  if (child > 0) _exit(0);
  sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  seen = calloc(MAXSEQ, 1);
  struct sigaction sa = {0};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigaction(SIGRTMIN + 1, &sa, NULL);
  pid_t me = getpid();
  // Blocked until `sender` is known here: the first signal may beat fork()'s return.
  sigset_t rt, old;
  sigemptyset(&rt);
  sigaddset(&rt, SIGRTMIN + 1);
  sigprocmask(SIG_BLOCK, &rt, &old);
  sender = fork();
  if (sender == 0) send_stream(me, gap_us);
  sigprocmask(SIG_SETMASK, &old, NULL);
  printf("ready pid=%d sender=%d\n", me, sender);
  fflush(stdout);
  int ctl = fcntl(3, F_GETFD) >= 0 ? 3 : 0;
  char line[64];
  for (;;) {
    for (volatile int i = 0; i < 20000; i++) {}
    struct timespec nap = {0, 50000};
    nanosleep(&nap, NULL);
    struct pollfd p = {ctl, POLLIN, 0};
    if (poll(&p, 1, 0) <= 0) continue;
    ssize_t n = read(ctl, line, sizeof line - 1);
    if (n <= 0) _exit(0);
    line[n] = 0;
    if (!strncmp(line, "check", 5)) check();
    if (!strncmp(line, "sent", 4)) {
      printf("sent=%ld\n", sh->sent);
      fflush(stdout);
    }
  }
}
