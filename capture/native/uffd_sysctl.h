// vm.unprivileged_userfaultfd, opened for one injected call at most. Both the
// helper (which opens it) and the engine (which restores it if the helper dies
// with it open) use these.
#pragma once
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>

namespace bgsnap {

inline const char* kUffdSysctl = "/proc/sys/vm/unprivileged_userfaultfd";

inline int ReadUffdSysctl() {
  char buf[8] = {0};
  int fd = open(kUffdSysctl, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  return n > 0 ? atoi(buf) : -1;
}

inline bool WriteUffdSysctl(int v) {
  int fd = open(kUffdSysctl, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char c = static_cast<char>('0' + v);
  bool ok = write(fd, &c, 1) == 1;
  close(fd);
  return ok;
}

}  // namespace bgsnap
