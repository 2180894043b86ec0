// Holds a ptrace attachment on PID until killed, so a test can show that an
// already-traced process is refused with a clear error and left untouched.
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  if (ptrace(PTRACE_SEIZE, atoi(argv[1]), NULL, NULL) != 0) { perror("PTRACE_SEIZE"); return 1; }
  printf("tracing\n");
  fflush(stdout);
  for (;;) pause();
}
