// Remote syscalls in a frozen thread. We borrow a `syscall` instruction (0f 05)
// from the target's vDSO, so we never write code into the target: from a clean
// interrupt stop, point rip at it, put the call in the registers, and let the
// thread run exactly that call between its syscall-entry and -exit stops
// (PTRACE_SYSCALL: no single-step, so no SIGTRAP or trap flag is ever left).
//
// orig_rax = -1 stops the kernel's syscall-restart logic from rewriting our
// registers on the way out. The saved registers go back while the thread is
// still stopped (exit stop, or the delivery stop of a signal that came first),
// and it is parked in an interrupt stop again: an interrupted read() or
// nanosleep() then restarts as if nothing happened.
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>

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

// Only a thread in a clean interrupt stop (never one holding a signal), the
// main thread preferred. Kept while it stays parked, so the calls of one
// injection all use the same thread.
ThreadState* Freezer::Injectee() {
  if (injectee_ >= 0 && threads_[injectee_].eventStop && threads_[injectee_].attached) {
    return &threads_[injectee_];
  }
  injectee_ = -1;
  ThreadState* best = nullptr;
  for (ThreadState& t : threads_) {
    if (!t.attached || t.exited || !t.eventStop || t.pendingSignal) continue;
    if (!best || t.tid == pid_) best = &t;
  }
  if (best) injectee_ = static_cast<int>(best - threads_.data());
  return best;
}

bool Freezer::InjecteeSp(uint64_t* sp) {
  ThreadState* t = Injectee();
  if (t) *sp = t->regs.rsp;
  return t != nullptr;
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

bool Freezer::RemoteSyscall(long nr, const long args[6], long* result, Failure* f,
                            const std::function<bool()>& hold) {
  ThreadState* t = Injectee();
  if (!t) return f->Set(EAGAIN, "no thread in a clean interrupt stop to run a syscall in");
  if (!syscallInsn_) return f->Set(ENOEXEC, "no syscall instruction to borrow");
  user_regs_struct saved, regs;
  if (Ptrace(PTRACE_GETREGS, t->tid, &saved) != 0) return f->Set(errno, "ptrace(GETREGS)");
  // Read before the thread runs: the kernel clears rseq_cs once it sees our rip.
  user_regs_struct restored = RseqRestore(t->tid, saved);
  regs = saved;
  LoadArgs(&regs, syscallInsn_, nr, args);
  if (Ptrace(PTRACE_SETREGS, t->tid, &regs) != 0) return f->Set(errno, "ptrace(SETREGS)");
  if (hold && !hold()) {
    // Never resumed: putting the registers back is the whole rollback.
    Ptrace(PTRACE_SETREGS, t->tid, &saved);
    return f->Set(ECONNRESET, "the capture went away during injection; registers restored");
  }
  uint64_t mask = 0;
  bool masked = BlockSignals(t->tid, &mask);
  bool ran = RunInjected(t, result, f);
  if (t->exited) return false;
  bool back = Ptrace(PTRACE_SETREGS, t->tid, &restored) == 0;
  int err = errno;
  if (masked) back = ptrace(PTRACE_SETSIGMASK, t->tid, reinterpret_cast<void*>(8), &mask) == 0 && back;
  if (!back) return f->Set(err, "restoring the registers of thread " + std::to_string(t->tid));
  bool parked = ParkAfter(t, f);
  return ran && parked && !f->failed();
}

static pid_t Tid(ThreadState* t) { return t->tid; }

// Block every signal for the injected call, so none is dequeued into a
// delivery stop while our registers are in place (a signal storm would
// otherwise fail every try); they stay pending and are delivered, with their
// siginfo, once the mask is back. Not for a thread whose ppoll/sigsuspend-style
// temporary mask is in force (GETSIGMASK then reports the saved mask, not
// SigBlk): setting the mask would end that early.
bool Freezer::BlockSignals(pid_t tid, uint64_t* orig) {
  if (ptrace(PTRACE_GETSIGMASK, tid, reinterpret_cast<void*>(8), orig) != 0) return false;
  std::ifstream in("/proc/" + std::to_string(pid_) + "/task/" + std::to_string(tid) + "/status");
  std::string line;
  uint64_t blocked = ~*orig;
  while (std::getline(in, line)) {
    if (line.rfind("SigBlk:", 0) == 0) blocked = strtoull(line.c_str() + 7, nullptr, 16);
  }
  if (blocked != *orig) return false;
  uint64_t all = ~0ull;
  return ptrace(PTRACE_SETSIGMASK, tid, reinterpret_cast<void*>(8), &all) == 0;
}

// Resume into the injected call and wait for its exit stop. On a timeout the
// thread is interrupted (a blocking call returns -EINTR/-ERESTART*) and we wait
// for that stop, so the caller can always restore. Leaves the thread stopped.
bool Freezer::RunInjected(ThreadState* t, long* result, Failure* f) {
  t->eventStop = false;
  t->syscallStop = true;
  if (Ptrace(PTRACE_SYSCALL, Tid(t), 0L) != 0) return f->Set(errno, "ptrace(SYSCALL)");
  double timeout = stepTimeoutMs;
  bool timedOut = false;
  for (;;) {
    int st = 0;
    int r = WaitStatus(Tid(t), &st, timeout);
    if (r == 0 && !timedOut) {
      timedOut = true;
      timeout = 30000;  // it must stop for its registers to be restored
      Ptrace(PTRACE_INTERRUPT, Tid(t), 0L);
      continue;
    }
    if (r == 0) {
      return f->Set(ETIMEDOUT, "thread " + std::to_string(Tid(t)) + " stuck in an injected "
                               "syscall did not stop when interrupted");
    }
    if (r < 0 || !WIFSTOPPED(st)) {
      t->exited = true;
      t->attached = false;
      return f->Set(ESRCH, "thread " + std::to_string(Tid(t)) + " exited during injection");
    }
    if (WSTOPSIG(st) == (SIGTRAP | 0x80)) {
      if (SyscallStop(Tid(t), timedOut, result)) break;
    } else if ((st >> 16) == PTRACE_EVENT_STOP || (st >> 16) == 0) {
      return OtherStop(t, st, f);
    } else {
      Ptrace(PTRACE_SYSCALL, Tid(t), 0L);  // another ptrace event: carry on
    }
  }
  if (timedOut) {
    return f->Set(ETIMEDOUT, "injected syscall " + std::to_string(Tid(t)) + " took longer than " +
                                 std::to_string(stepTimeoutMs) + " ms; interrupted and restored");
  }
  return true;
}

// At a syscall stop of the injected call: true at its exit, with the result.
bool Freezer::SyscallStop(pid_t tid, bool skip, long* result) {
  uint8_t info[88] = {0};
  ptrace(PTRACE_GET_SYSCALL_INFO, tid, reinterpret_cast<void*>(sizeof info), info);
  user_regs_struct cur;
  Ptrace(PTRACE_GETREGS, tid, &cur);
  if (info[0] == PTRACE_SYSCALL_INFO_EXIT) {
    *result = static_cast<long>(cur.rax);
    return true;
  }
  if (skip) {  // timed out before it even began: never run it
    cur.orig_rax = static_cast<unsigned long long>(-1);
    Ptrace(PTRACE_SETREGS, tid, &cur);
  }
  Ptrace(PTRACE_SYSCALL, tid, 0L);
  return false;
}

// Stopped before our call ran: by an interrupt or group stop, or by a signal
// (only SIGKILL/SIGSTOP get through the mask, or any when no mask was set).
// A signal is held in its delivery stop, where PTRACE_DETACH re-delivers it
// with its siginfo.
bool Freezer::OtherStop(ThreadState* t, int st, Failure* f) {
  t->syscallStop = false;
  if ((st >> 16) == PTRACE_EVENT_STOP) {
    t->eventStop = true;
    return f->Set(EIO, "injected syscall stopped before it ran");
  }
  t->pendingSignal = WSTOPSIG(st);
  return f->Set(EAGAIN, "signal " + std::to_string(t->pendingSignal) + " arrived during injection");
}

bool Freezer::SetOptions(pid_t tid, long options, Failure* f) {
  if (Ptrace(PTRACE_SETOPTIONS, tid, options) == 0) return true;
  return f->Set(errno, "ptrace(PTRACE_SETOPTIONS) of thread " + std::to_string(tid));
}

// From the exit stop (registers already restored) back to an interrupt stop:
// the pending interrupt is taken before any signal and before user space.
bool Freezer::ParkAfter(ThreadState* t, Failure* f) {
  if (!t->syscallStop) return true;  // already in an interrupt or signal-delivery stop
  t->syscallStop = false;
  Ptrace(PTRACE_INTERRUPT, t->tid, 0L);
  if (Ptrace(PTRACE_CONT, t->tid, 0L) != 0) return f->Set(errno, "ptrace(CONT) to park");
  int st = 0;
  int r = WaitStatus(t->tid, &st, 30000);
  if (r <= 0 || !WIFSTOPPED(st)) {
    if (r != 0) {
      t->attached = false;
      t->exited = true;
    }
    return f->Set(ESRCH, "thread " + std::to_string(t->tid) + " did not park");
  }
  if ((st >> 16) == PTRACE_EVENT_STOP) t->eventStop = true;
  else if ((st >> 16) == 0) t->pendingSignal = WSTOPSIG(st);
  return true;
}

// The rseq ABI (linux/rseq.h): struct rseq has rseq_cs at offset 8; a critical
// section descriptor is {u32 version, u32 flags, u64 start_ip,
// u64 post_commit_offset, u64 abort_ip}; abort_ip is preceded by the signature.
struct RseqConfig {
  uint64_t abi;
  uint32_t size, sig, flags, pad;
};

static bool ReadRemote(pid_t pid, uint64_t addr, void* out, size_t n) {
  iovec l{out, n}, r{reinterpret_cast<void*>(addr), n};
  return process_vm_readv(pid, &l, 1, &r, 1, 0) == static_cast<ssize_t>(n);
}

// A thread stopped inside an rseq critical section resumes at its abort
// handler: the kernel would send it there after this stop anyway (it was
// scheduled out), but seeing our rip it clears rseq_cs instead, and resuming
// inside the section would then run it unprotected.
user_regs_struct Freezer::RseqRestore(pid_t tid, const user_regs_struct& saved) {
  user_regs_struct out = saved;
  RseqConfig c{};
  if (ptrace(static_cast<__ptrace_request>(PTRACE_GET_RSEQ_CONFIGURATION), tid,
             reinterpret_cast<void*>(sizeof c), &c) <= 0 || !c.abi) {
    return out;
  }
  uint64_t csPtr = 0;
  struct { uint32_t version, flags; uint64_t start, postCommit, abort; } cs;
  uint32_t sig = 0;
  if (!ReadRemote(pid_, c.abi + 8, &csPtr, 8) || !csPtr || !ReadRemote(pid_, csPtr, &cs, sizeof cs)) {
    return out;
  }
  if (saved.rip - cs.start >= cs.postCommit) return out;
  // A bad signature makes the kernel kill the thread; leave that to it.
  if (!ReadRemote(pid_, cs.abort - 4, &sig, 4) || sig != c.sig) return out;
  out.rip = cs.abort;
  return out;
}

}  // namespace bgsnap
