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
// The process forks itself into the background (so it is not the test runner's
// child: the runner's own waitpid would otherwise see ptrace stops), and prints
// "ready pid=P pattern=0xADDR size=N counter=0xADDR" once every thread has
// entered its chain. It runs until killed.
#define _GNU_SOURCE
#include <pthread.h>
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

int main(void) {
  pid_t child = fork();
  if (child < 0) { perror("fork"); return 3; }
  if (child > 0) _exit(0);
  init_memory();
  pthread_t th;
  pthread_create(&th, NULL, worker_main, NULL);
  pthread_create(&th, NULL, busy_main, NULL);
  while (__atomic_load_n(&entered, __ATOMIC_SEQ_CST) < 2) usleep(1000);
  printf("ready pid=%d pattern=0x%lx size=%d counter=0x%lx\n", getpid(), (unsigned long)(uintptr_t)pattern,
         PATTERN_SIZE, (unsigned long)(uintptr_t)&busy_counter);
  fflush(stdout);
  level_one();
  return 0;
}
