// Test target for ELF core conversion: three threads, each parked in a call chain
// with distinctive names, and known values in globals, on the heap and in a
// pattern-filled mapping, so gdb's view of the core can be checked exactly.
//
//   backtrace            (built with gcc -g -O0 -pthread by test/elf-core.test.ts)
//
//   main thread:  main -> level_one -> level_two -> pause()
//   thread 2:     worker_main -> worker_wait -> nanosleep()
//   thread 3:     busy_main -> busy_loop (spins, writing busy_counter and scratch)
//
// What a kernel core would hold besides: the worker's ymm0 holds 0xa0, 0xa1, ...
// 0xbf (NT_X86_XSTATE); "jit" is anonymous code made read+exec after it was
// written (mov $42,%eax; ret, then the text jit-marker-HEX; SIGUSR1 makes it
// writable and rewrites the text); "ro" anonymous data made read-only
// (ro-marker-HEX); "secret" a MADV_DONTDUMP range holding dd-secret-HEX, which
// cores leave out, next to "marker", a normal mapping holding dd-marker-HEX. The strings are built at run time so that no file
// mapping holds them. Its real uid and gid are 1234 and 4321 (effective 0).
//
// The process forks itself into the background (so it is not the test runner's
// child: the runner's own waitpid would otherwise see ptrace stops), and prints
// "ready pid=P pattern=0xADDR size=N counter=0xADDR jit=0xADDR ro=0xADDR
// secret=0xADDR marker=0xADDR" once every thread has entered its chain. It runs
// until killed.
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PATTERN_SIZE (1 << 20)

long some_global = 0x5eed1234abcdL;
char greeting[32] = "hello from bgsnap";
int *heap_values;
unsigned char *pattern;
volatile unsigned long busy_counter;
volatile unsigned long scratch[512];
static volatile int entered;

void level_two(void) {
  __atomic_add_fetch(&entered, 1, __ATOMIC_SEQ_CST);
  for (;;) pause();
}

void level_one(void) { level_two(); }

void worker_wait(void) {
  struct timespec ts = {1000, 0};
  unsigned char ymm[32];
  for (int i = 0; i < 32; i++) ymm[i] = (unsigned char)(0xa0 + i);
  __asm__ volatile("vmovdqu %0, %%ymm0" : : "m"(ymm) : "xmm0");
  __atomic_add_fetch(&entered, 1, __ATOMIC_SEQ_CST);
  for (;;) nanosleep(&ts, NULL);
}

void *worker_main(void *arg) {
  (void)arg;
  worker_wait();
  return NULL;
}

void busy_loop(void) {
  __atomic_add_fetch(&entered, 1, __ATOMIC_SEQ_CST);
  for (;;) {
    unsigned long c = ++busy_counter;
    scratch[c % 512] = c;
  }
}

void *busy_main(void *arg) {
  (void)arg;
  busy_loop();
  return NULL;
}

// The byte at offset i of the pattern mapping; the test computes the same.
static unsigned char pattern_byte(size_t i) { return (unsigned char)((i * 7 + (i >> 12) * 13 + 3) & 0xff); }

static void init_memory(void) {
  heap_values = malloc(4 * sizeof *heap_values);
  for (int i = 0; i < 4; i++) heap_values[i] = 11 * (i + 1);
  pattern = mmap(NULL, PATTERN_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (pattern == MAP_FAILED) { perror("mmap"); _exit(3); }
  for (size_t i = 0; i < PATTERN_SIZE; i++) pattern[i] = pattern_byte(i);
}

#define HEX 0x5ec2e7c0ffeeUL
unsigned char *jit, *ro, *secret, *marker;

// A fresh anonymous page holding text, with protection prot afterwards.
static unsigned char *page_with(const char *what, int prot) {
  unsigned char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) { perror("mmap"); _exit(3); }
  snprintf((char *)p + 16, 64, "%s-%lx", what, HEX * 3);
  if (prot != (PROT_READ | PROT_WRITE) && mprotect(p, 4096, prot) != 0) { perror("mprotect"); _exit(3); }
  return p;
}

// 48 MiB of written memory, so the capture takes its two-stop way (protect
// while running, then the snapshot freeze), the one real programs get.
#define BALLAST_SIZE (48 << 20)
unsigned char *ballast;

// SIGUSR1: the JIT flips the code page writable and rewrites it (jit-rewrite-HEX),
// as a JIT patching code does; a capture must still save the old bytes.
static char rewrite_text[64];

static void rewrite_jit(int sig) {
  (void)sig;
  if (mprotect(jit, 4096, PROT_READ | PROT_WRITE) == 0) memcpy(jit + 16, rewrite_text, sizeof rewrite_text);
}

static void init_core_extras(void) {
  // The code page is mapped before the ballast, so above it (mmap goes down):
  // a capture's address-order scan reaches it only after the ballast.
  static const unsigned char code[] = {0xb8, 42, 0, 0, 0, 0xc3}; // mov $42,%eax; ret
  jit = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (jit == MAP_FAILED) { perror("mmap"); _exit(3); }
  memcpy(jit, code, sizeof code);
  snprintf((char *)jit + 16, 64, "jit-marker-%lx", HEX * 3);
  if (mprotect(jit, 4096, PROT_READ | PROT_EXEC) != 0 || ((int (*)(void))jit)() != 42) _exit(4);
  snprintf(rewrite_text, sizeof rewrite_text, "jit-rewrite-%lx", HEX * 3);
  signal(SIGUSR1, rewrite_jit);
  ballast = mmap(NULL, BALLAST_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ballast == MAP_FAILED) { perror("mmap"); _exit(3); }
  memset(ballast, 0x5a, BALLAST_SIZE);
  ro = page_with("ro-marker", PROT_READ);
  secret = page_with("dd-secret", PROT_READ | PROT_WRITE);
  if (madvise(secret, 4096, MADV_DONTDUMP) != 0) { perror("madvise"); _exit(3); }
  marker = page_with("dd-marker", PROT_READ | PROT_WRITE);
}

int main(void) {
  pid_t child = fork();
  if (child < 0) { perror("fork"); return 3; }
  if (child > 0) _exit(0);
  if (setresgid(4321, 0, 0) != 0 || setresuid(1234, 0, 0) != 0) { perror("setresuid"); return 3; }
  init_memory();
  init_core_extras();
  pthread_t th;
  pthread_create(&th, NULL, worker_main, NULL);
  pthread_create(&th, NULL, busy_main, NULL);
  while (__atomic_load_n(&entered, __ATOMIC_SEQ_CST) < 2) usleep(1000);
  printf("ready pid=%d pattern=0x%lx size=%d counter=0x%lx jit=%p ro=%p secret=%p marker=%p\n", getpid(),
         (unsigned long)(uintptr_t)pattern, PATTERN_SIZE, (unsigned long)(uintptr_t)&busy_counter, (void *)jit,
         (void *)ro, (void *)secret, (void *)marker);
  fflush(stdout);
  level_one();
  return 0;
}
