// main() of a test target that runs as a forked child of a small parent: the
// parent only waits and reports how the child ended ("exit status=N signal=N"),
// so a test can tell a clean exit from a kill without being the child's parent
// (our own waitpid would otherwise see the child's ptrace stops).
#pragma once
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void Target(const char *mode);

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  setvbuf(stdout, NULL, _IOLBF, 0);
  pid_t child = fork();
  if (child == 0) Target(argv[1]);
  int st = 0;
  waitpid(child, &st, 0);
  printf("exit status=%d signal=%d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  return 0;
}
