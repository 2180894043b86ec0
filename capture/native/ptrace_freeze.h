// Freezing a process (inside the bgsnap-freezer helper, its only tracer): every
// thread ptrace-stopped, registers recorded, and a remote syscall primitive
// through a `syscall` instruction in the target's vDSO.
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

// Every thread is seized with these (plus the caller's extra options).
// TRACESYSGOOD: injected syscalls run between syscall stops (inject.cc).
constexpr long kSeizeOptions = PTRACE_O_TRACECLONE | PTRACE_O_TRACESYSGOOD;

class Freezer {
 public:
  explicit Freezer(pid_t pid) : pid_(pid) {}
  ~Freezer() { Detach(); }  // safety net: never leave a thread stopped

  // Seize + interrupt every thread until the thread list is stable, then record
  // each one's registers. With `injectable`, at least one thread must sit in a
  // clean interrupt stop (not a signal-delivery stop): if none does, everything
  // is detached (held signals re-delivered) and frozen again, a few times.
  // On failure everything seized so far is detached.
  bool Freeze(Failure* f, long seizeOptions, bool injectable);
  // Resume every thread, re-delivering held signals with their siginfo.
  void Detach();

  // Run one syscall in a thread parked in an interrupt stop, and leave it
  // parked there again with its registers restored (rip moved to the rseq
  // abort handler when it was stopped inside a critical section, as the kernel
  // would). `hold` runs while the injected registers are in place and the
  // thread not yet resumed; false aborts (registers restored, ECONNRESET).
  // Signals are blocked for the call (PTRACE_SETSIGMASK, mask put back); one
  // that still arrives first is held in its delivery stop: EAGAIN.
  // Returns the raw result (negative errno on failure) in *result.
  bool RemoteSyscall(long nr, const long args[6], long* result, Failure* f,
                     const std::function<bool()>& hold = nullptr);
  pid_t InjecteeTid() { ThreadState* t = Injectee(); return t ? t->tid : 0; }
  bool SetOptions(pid_t tid, long options, Failure* f);
  bool FindSyscallInsn(uint64_t vdsoStart, uint64_t vdsoEnd, Failure* f);
  // The injection thread's stack pointer, for scratch bytes below its red zone.
  bool InjecteeSp(uint64_t* sp);

  std::vector<ThreadState>& threads() { return threads_; }
  int rounds() const { return rounds_; }
  uint32_t stepTimeoutMs = 2000;

 private:
  bool FreezeOnce(Failure* f, long seizeOptions);
  bool SeizeNew(bool* added, long seizeOptions, Failure* f);
  bool WaitStop(size_t i, Failure* f);
  int WaitStatus(pid_t tid, int* status, double timeoutMs);
  ThreadState* Injectee();
  void DetachOne(ThreadState& t);
  bool RunInjected(ThreadState* t, long* result, Failure* f);
  bool SyscallStop(pid_t tid, bool skip, long* result);
  bool OtherStop(ThreadState* t, int st, Failure* f);
  bool ParkAfter(ThreadState* t, Failure* f);
  bool BlockSignals(pid_t tid, uint64_t* orig);
  user_regs_struct RseqRestore(pid_t tid, const user_regs_struct& saved);

  pid_t pid_;
  std::vector<ThreadState> threads_;
  uint64_t syscallInsn_ = 0;
  int rounds_ = 0;
  int injectee_ = -1;
};

}  // namespace bgsnap
