// Freezing a process: every thread ptrace-stopped, registers recorded, and a
// remote syscall primitive through a `syscall` instruction in the target's vDSO.
#pragma once
#include <sys/ptrace.h>

#include <functional>

#include "capture.h"

namespace bgsnap {

// ptrace(2) with addr always 0 and data passed as a full 64-bit word: glibc's
// wrapper is variadic, and an int passed there leaves the register's upper half
// undefined (we saw PTRACE_SEIZE fail with EPERM from that).
inline long Ptrace(int req, pid_t tid, long data) {
  return ptrace(static_cast<__ptrace_request>(req), tid, nullptr, reinterpret_cast<void*>(data));
}
inline long Ptrace(int req, pid_t tid, void* data) {
  return ptrace(static_cast<__ptrace_request>(req), tid, nullptr, data);
}

class Freezer {
 public:
  explicit Freezer(pid_t pid) : pid_(pid) {}
  ~Freezer() { Detach(); }  // safety net: never leave a thread stopped

  // Seize + interrupt every thread until the thread list is stable, then record
  // each one's registers. On failure everything seized so far is detached.
  // `idle` runs while we wait for threads to stop: a thread blocked on our
  // userfaultfd (a fault, or a madvise waiting for its event to be read) stops
  // only once that is served.
  bool Freeze(Failure* f, const std::function<void()>& idle = nullptr);
  // Resume every thread, re-delivering held signals.
  void Detach();

  // Run one syscall in a stopped thread and restore its registers exactly.
  // Returns the raw result (negative errno on failure) in *result.
  bool RemoteSyscall(long nr, const long args[6], long* result, Failure* f);
  // Clear the single-step trap flag and leave the injection thread in a clean
  // event stop, so our death at any later point cannot SIGTRAP the target.
  bool Park(Failure* f);
  pid_t InjecteeTid() { ThreadState* t = Injectee(); return t ? t->tid : 0; }
  bool SetOptions(pid_t tid, long options, Failure* f);
  bool FindSyscallInsn(uint64_t vdsoStart, uint64_t vdsoEnd, Failure* f);

  std::vector<ThreadState>& threads() { return threads_; }
  int rounds() const { return rounds_; }

 private:
  bool SeizeNew(bool* added, Failure* f);
  bool WaitStop(size_t i, Failure* f);
  int WaitStatus(pid_t tid, int* status, double timeoutMs);
  ThreadState* Injectee();
  void DetachOne(ThreadState& t);

  pid_t pid_;
  std::vector<ThreadState> threads_;
  uint64_t syscallInsn_ = 0;
  int rounds_ = 0;
  int injectee_ = -1;
  const std::function<void()>* idle_ = nullptr;
};

}  // namespace bgsnap
