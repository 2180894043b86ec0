// Freeze: PTRACE_SEIZE + PTRACE_INTERRUPT every thread, repeated until no new
// thread appears. Threads are left in whatever stop they reached (interrupt,
// clone event, or signal delivery): each is a real stop, and leaving a signal
// delivery stop in place lets PTRACE_DETACH re-deliver the signal with its
// original siginfo. Runs in the bgsnap-freezer helper (freezer_main.cc).
#include "ptrace_freeze.h"

#include <dirent.h>
#include <elf.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <fstream>

namespace bgsnap {

static bool ListTasks(pid_t pid, std::vector<pid_t>* out) {
  std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = opendir(dir.c_str());
  if (!d) return false;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') out->push_back(static_cast<pid_t>(atoi(e->d_name)));
  }
  closedir(d);
  return true;
}

static std::string TracerOf(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("TracerPid:", 0) == 0) return line.substr(10);
  }
  return "?";
}

// Poll for a ptrace status without blocking forever: a thread in
// uninterruptible sleep may not stop, and we must be able to give up.
int Freezer::WaitStatus(pid_t tid, int* status, double timeoutMs) {
  double deadline = NowMs() + timeoutMs;
  long sleepNs = 2000;
  for (;;) {
    int r = waitpid(tid, status, __WALL | WNOHANG);
    if (r != 0) return r < 0 ? -errno : r;
    if (NowMs() > deadline) return 0;
    timespec ts{0, sleepNs};
    nanosleep(&ts, nullptr);
    sleepNs = std::min(sleepNs * 2, 200000L);
  }
}

bool Freezer::SeizeNew(bool* added, long seizeOptions, Failure* f) {
  std::vector<pid_t> tids;
  if (!ListTasks(pid_, &tids)) {
    return f->Set(ESRCH, "process " + std::to_string(pid_) + " does not exist");
  }
  for (pid_t tid : tids) {
    auto known = std::find_if(threads_.begin(), threads_.end(),
                              [tid](const ThreadState& t) { return t.tid == tid; });
    if (known != threads_.end()) continue;
    long opts = kSeizeOptions | seizeOptions;
    if (Ptrace(PTRACE_SEIZE, tid, opts) != 0) {
      if (errno == ESRCH) continue;  // exited between listing and seizing
      int e = errno;
      return f->Set(e, "ptrace(PTRACE_SEIZE) of thread " + std::to_string(tid) + " of process " +
                           std::to_string(pid_) + " failed (TracerPid:" + TracerOf(pid_) +
                           "; an already-traced process or one we lack permission for "
                           "cannot be captured)");
    }
    ThreadState t;
    t.tid = tid;
    t.attached = true;
    threads_.push_back(t);
    Ptrace(PTRACE_INTERRUPT, tid, 0L);
    *added = true;
  }
  return true;
}

// Wait until thread i reaches a stop. A clone event adds the new thread, which
// the kernel auto-attached and will stop on its own.
bool Freezer::WaitStop(size_t i, Failure* f) {
  pid_t tid = threads_[i].tid;
  int st = 0;
  int r = WaitStatus(tid, &st, 3000);
  if (r == 0) return f->Set(EBUSY, "thread " + std::to_string(tid) + " did not stop within 3 s");
  if (r < 0 || WIFEXITED(st) || WIFSIGNALED(st)) {
    threads_[i].exited = true;
    threads_[i].attached = false;
    return true;
  }
  ThreadState& t = threads_[i];
  t.stopped = true;
  int event = st >> 16;
  if (event == PTRACE_EVENT_STOP) {
    t.eventStop = true;
  } else if (event == PTRACE_EVENT_CLONE) {
    unsigned long child = 0;
    Ptrace(PTRACE_GETEVENTMSG, tid, &child);
    ThreadState c;
    c.tid = static_cast<pid_t>(child);
    c.attached = true;
    threads_.push_back(c);
  } else if (event == 0) {
    t.pendingSignal = WSTOPSIG(st);
  }
  return true;
}

// The XSAVE area as the kernel's cores hold it (NT_X86_XSTATE). Its size is the
// CPU's (~2.7 KiB with AVX-512, ~11 KiB with AMX): the kernel shortens iov_len
// to it, and later threads get a buffer of just that size. A CPU without
// XSAVE leaves it empty: not an error.
static void GetXstate(ThreadState& t) {
  static std::atomic<size_t> size{16384};
  t.xstate.resize(size.load());
  iovec iov{t.xstate.data(), t.xstate.size()};
  if (ptrace(PTRACE_GETREGSET, t.tid, reinterpret_cast<void*>(NT_X86_XSTATE), &iov) != 0) iov.iov_len = 0;
  t.xstate.resize(iov.iov_len);
  if (iov.iov_len > 0) size = iov.iov_len;
}

bool Freezer::FreezeOnce(Failure* f, long seizeOptions) {
  threads_.clear();
  injectee_ = -1;
  for (rounds_ = 1; rounds_ <= 100; rounds_++) {
    bool added = false;
    if (!SeizeNew(&added, seizeOptions, f)) break;
    for (size_t i = 0; i < threads_.size() && !f->failed(); i++) {
      if (threads_[i].attached && !threads_[i].stopped) WaitStop(i, f);
    }
    if (f->failed()) break;
    if (!added) break;
  }
  if (!f->failed() && rounds_ > 100) f->Set(EAGAIN, "thread list never became stable");
  threads_.erase(std::remove_if(threads_.begin(), threads_.end(),
                                [](const ThreadState& t) { return t.exited; }),
                 threads_.end());
  if (!f->failed() && threads_.empty()) f->Set(ESRCH, "process exited while being frozen");
  for (ThreadState& t : threads_) {
    if (f->failed()) break;
    if (Ptrace(PTRACE_GETREGS, t.tid, &t.regs) != 0 ||
        Ptrace(PTRACE_GETFPREGS, t.tid, &t.fpregs) != 0) {
      f->Set(errno, "ptrace(GETREGS) of thread " + std::to_string(t.tid));
    }
    GetXstate(t);
  }
  if (f->failed()) Detach();
  return !f->failed();
}

// Injecting into a thread held in a signal-delivery stop would consume or
// reorder its signal; when every thread is in one (a signal storm), let them
// all take their signals and try again.
bool Freezer::Freeze(Failure* f, long seizeOptions, bool injectable) {
  for (int tries = 0; tries < 5; tries++) {
    if (!FreezeOnce(f, seizeOptions)) return false;
    if (!injectable || Injectee()) return true;
    Detach();
    usleep(1000 << tries);
  }
  return f->Set(EAGAIN, "no thread of process " + std::to_string(pid_) +
                            " reached a clean interrupt stop in 5 freezes (every thread was "
                            "taking a signal); nothing was injected");
}

void Freezer::DetachOne(ThreadState& t) {
  if (!t.attached) return;
  if (!t.stopped) {
    // PTRACE_DETACH needs a stopped tracee; bring it to a stop first.
    Ptrace(PTRACE_INTERRUPT, t.tid, 0L);
    int st;
    if (WaitStatus(t.tid, &st, 1000) > 0 && WIFSTOPPED(st) && (st >> 16) == 0) {
      t.pendingSignal = WSTOPSIG(st);
    }
  }
  // From a signal-delivery stop this delivers the held signal with its siginfo.
  Ptrace(PTRACE_DETACH, t.tid, t.pendingSignal);
  t.attached = false;
}

void Freezer::Detach() {
  for (ThreadState& t : threads_) DetachOne(t);
}

}  // namespace bgsnap
