// rseq: the main thread spends nearly all its time inside one long restartable
// sequence (glibc registers the thread's rseq area). At the commit point it
// checks that rseq_cs is still set: the kernel clears it only when it sees the
// thread's ip outside the section, so finding it clear while inside means the
// thread was resumed inside the section after running elsewhere (an injected
// syscall) without being sent to its abort handler: a broken atomicity.
// Prints "ready pid=N"; on fd 3 "counts" answers "counts commits aborts violations".
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/rseq.h>
#include <unistd.h>

static volatile uint64_t commits, aborts, violations;

static void *section_loop(void *rseq_area) {
  for (;;) {
    __asm__ __volatile__ goto(
        ".pushsection __rseq_cs, \"aw\"\n\t"
        ".balign 32\n\t"
        "3: .long 0, 0\n\t"
        ".quad 1f, (2f - 1f), 4f\n\t"
        ".popsection\n\t"
        "leaq 3b(%%rip), %%rax\n\t"
        "movq %%rax, 8(%[rseq])\n\t"  /* the store must end right at the start label */
        "1:\n\t"
        "movq $200000, %%rcx\n\t"
        "5: decq %%rcx\n\t"
        "jnz 5b\n\t"
        "cmpq $0, 8(%[rseq])\n\t"
        "je %l[violation]\n\t"
        "2:\n\t"
        ".pushsection __rseq_failure, \"ax\"\n\t"
        ".long 0x53053053\n\t"  /* RSEQ_SIG on x86 */
        "4: jmp %l[aborted]\n\t"
        ".popsection\n\t"
        :
        : [rseq] "r"(rseq_area)
        : "rax", "rcx", "memory", "cc"
        : aborted, violation);
    commits++;
    continue;
  aborted:
    aborts++;
    continue;
  violation:
    violations++;
  }
  return NULL;
}

static void *commands(void *arg) {
  FILE *ctl = arg;
  char line[64];
  while (fgets(line, sizeof line, ctl)) {
    if (!strncmp(line, "counts", 6)) {
      printf("counts %llu %llu %llu\n", (unsigned long long)commits, (unsigned long long)aborts,
             (unsigned long long)violations);
      fflush(stdout);
    }
  }
  _exit(0);
}

int main(void) {
  if (__rseq_size == 0) { fprintf(stderr, "glibc did not register rseq\n"); return 2; }
  pid_t child = fork();  // into the background: not the test runner's child
  if (child < 0) return 1;
  if (child > 0) _exit(0);
  printf("ready pid=%d\n", getpid());
  fflush(stdout);
  // Commands on a second thread, so the main thread (the one bgsnap prefers to
  // inject into) is nearly always inside its section.
  FILE *ctl = fcntl(3, F_GETFD) >= 0 ? fdopen(3, "r") : stdin;
  pthread_t th;
  pthread_create(&th, NULL, commands, ctl);
  section_loop((char *)__builtin_thread_pointer() + __rseq_offset);
  return 0;
}
