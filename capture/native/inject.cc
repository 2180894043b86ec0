// Remote syscalls in a frozen thread. We borrow a `syscall` instruction (0f 05)
// from the target's vDSO, so we never write into the target's memory: point rip
// at it, put the call in the registers, single-step, read rax, restore.
//
// orig_rax = -1 stops the kernel's syscall-restart logic from rewriting our
// registers on the way out; restoring the saved registers afterwards (while the
// thread is still stopped in the kernel's signal path) lets an interrupted
// read() or nanosleep() restart as if nothing happened.
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/wait.h>

#include <cerrno>

#include "ptrace_freeze.h"

namespace bgsnap {

bool Freezer::FindSyscallInsn(uint64_t vdsoStart, uint64_t vdsoEnd, Failure* f) {
  std::vector<uint8_t> image(vdsoEnd - vdsoStart);
  iovec local{image.data(), image.size()};
  iovec remote{reinterpret_cast<void*>(vdsoStart), image.size()};
  ssize_t n = process_vm_readv(pid_, &local, 1, &remote, 1, 0);
  if (n != static_cast<ssize_t>(image.size())) {
    return f->Set(n < 0 ? errno : EIO, "reading the target's vDSO");
  }
  for (size_t i = 0; i + 1 < image.size(); i++) {
    if (image[i] == 0x0f && image[i + 1] == 0x05) {
      syscallInsn_ = vdsoStart + i;
      return true;
    }
  }
  return f->Set(ENOEXEC, "no syscall instruction found in the target's vDSO");
}

// Prefer a thread in a clean interrupt stop, and the main thread among those.
// Chosen once, so the syscalls and the park all use the same thread.
ThreadState* Freezer::Injectee() {
  if (injectee_ >= 0) return &threads_[injectee_];
  ThreadState* best = nullptr;
  for (ThreadState& t : threads_) {
    if (!t.attached || t.exited) continue;
    if (t.eventStop && (t.tid == pid_ || !best || !best->eventStop)) best = &t;
    if (!best) best = &t;
  }
  if (best) injectee_ = static_cast<int>(best - threads_.data());
  return best;
}

static void LoadArgs(user_regs_struct* r, uint64_t insn, long nr, const long a[6]) {
  r->rip = insn;
  r->rax = static_cast<unsigned long long>(nr);
  r->orig_rax = static_cast<unsigned long long>(-1);
  r->rdi = a[0];
  r->rsi = a[1];
  r->rdx = a[2];
  r->r10 = a[3];
  r->r8 = a[4];
  r->r9 = a[5];
}

bool Freezer::RemoteSyscall(long nr, const long args[6], long* result, Failure* f) {
  ThreadState* t = Injectee();
  if (!t || !syscallInsn_) return f->Set(ESRCH, "no thread to run a syscall in");
  user_regs_struct saved, regs;
  if (Ptrace(PTRACE_GETREGS, t->tid, &saved) != 0) return f->Set(errno, "ptrace(GETREGS)");
  regs = saved;
  LoadArgs(&regs, syscallInsn_, nr, args);
  if (Ptrace(PTRACE_SETREGS, t->tid, &regs) != 0) return f->Set(errno, "ptrace(SETREGS)");
  // The stopped signal (if any) is consumed by the step: send it again at detach.
  if (t->pendingSignal) t->resendByKill = true;
  for (int tries = 0; tries < 16; tries++) {
    if (Ptrace(PTRACE_SINGLESTEP, t->tid, 0L) != 0) {
      f->Set(errno, "ptrace(SINGLESTEP)");
      break;
    }
    int st = 0;
    if (WaitStatus(t->tid, &st, 2000) <= 0 || !WIFSTOPPED(st)) {
      return f->Set(ESRCH, "thread " + std::to_string(t->tid) + " vanished during injection");
    }
    Ptrace(PTRACE_GETREGS, t->tid, &regs);
    if (WSTOPSIG(st) == SIGTRAP && regs.rip == syscallInsn_ + 2) break;
    // Another signal arrived before the step completed: hold it for detach.
    if ((st >> 16) == 0 && WSTOPSIG(st) != SIGTRAP) {
      t->pendingSignal = WSTOPSIG(st);
      t->resendByKill = true;
    }
    if (regs.rip == syscallInsn_ + 2) break;
  }
  *result = static_cast<long>(regs.rax);
  bool stepped = regs.rip == syscallInsn_ + 2;
  if (Ptrace(PTRACE_SETREGS, t->tid, &saved) != 0) return f->Set(errno, "restoring registers");
  t->eventStop = false;  // now in a SIGTRAP delivery stop until parked
  if (!stepped) return f->Set(EIO, "injected syscall did not complete");
  return !f->failed();
}

bool Freezer::SetOptions(pid_t tid, long options, Failure* f) {
  if (Ptrace(PTRACE_SETOPTIONS, tid, options) == 0) return true;
  return f->Set(errno, "ptrace(PTRACE_SETOPTIONS) of thread " + std::to_string(tid));
}

bool Freezer::Park(Failure* f) {
  ThreadState* t = Injectee();
  if (!t) return true;
  Ptrace(PTRACE_INTERRUPT, t->tid, 0L);
  // CONT with no signal drops the step's SIGTRAP and clears the trap flag; the
  // pending interrupt stops the thread again before it reaches user space.
  if (Ptrace(PTRACE_CONT, t->tid, 0L) != 0) return f->Set(errno, "ptrace(CONT) to park");
  int st = 0;
  if (WaitStatus(t->tid, &st, 2000) <= 0 || !WIFSTOPPED(st)) {
    return f->Set(ESRCH, "thread " + std::to_string(t->tid) + " did not park");
  }
  if ((st >> 16) == PTRACE_EVENT_STOP) {
    t->eventStop = true;
  } else if ((st >> 16) == 0) {
    // A real signal arrived; it is held here and re-delivered by PTRACE_DETACH.
    if (!t->resendByKill) t->pendingSignal = WSTOPSIG(st);
  }
  return true;
}

}  // namespace bgsnap
