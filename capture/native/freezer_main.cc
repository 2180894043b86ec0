// bgsnap-freezer: the capture's ptrace tracer, in a process of its own. The
// engine in the Node process asks it (freezer_proto.h) to freeze the target,
// inject the userfaultfd and detach. If the engine disappears (EOF, e.g. it
// was SIGKILLed) at any point, the helper finishes or undoes what it was doing
// (registers restored, sysctl restored, injected fds closed), detaches every
// thread re-delivering held signals, and exits. Killing the helper itself is
// still unsafe while an injected call is in flight (microseconds, see README).
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

#include "freezer_proto.h"
#include "ptrace_freeze.h"
#include "uffd_sysctl.h"

namespace bgsnap {

constexpr long kSuspendSeccomp = 1 << 21;  // PTRACE_O_SUSPEND_SECCOMP (linux/ptrace.h)

class Helper {
 public:
  Helper(int sock, pid_t pid) : sock_(sock), pid_(pid) {}
  int Serve();

 private:
  bool Dispatch(const FreezerReq& q);
  bool Reply(const Failure& f, const int64_t v[4], const std::string& payload, int fd = -1);
  bool Hold(int64_t point);
  bool PeerGone(int timeoutMs);
  bool OpFreeze(const FreezerReq& q);
  bool OpInjectUffd(const FreezerReq& q);
  bool OpenUffd(long* fd, int64_t* via, Failure* f);
  bool SuspendSeccomp(pid_t tid, bool allowed, bool* suspended, Failure* f);
  long DevUffd(Failure* f);
  bool Call(long nr, std::initializer_list<long> a, long* r, Failure* f, bool hold = false);

  int sock_;
  pid_t pid_;
  std::unique_ptr<Freezer> fz_;
  int64_t holdPoint_ = kHoldNone, holdMs_ = 0;
};

static bool WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n) {
    ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    c += w, n -= static_cast<size_t>(w);
  }
  return true;
}

static bool ReadAll(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n) {
    ssize_t r = read(fd, c, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r, n -= static_cast<size_t>(r);
  }
  return true;
}

bool Helper::Reply(const Failure& f, const int64_t v[4], const std::string& payload, int fd) {
  FreezerRep rep{};
  rep.err = f.err;
  const std::string& body = f.failed() ? f.what : payload;
  rep.len = static_cast<uint32_t>(body.size());
  if (v) memcpy(rep.v, v, sizeof rep.v);
  iovec iov{&rep, sizeof rep};
  char ctl[CMSG_SPACE(sizeof(int))] = {0};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  if (fd >= 0 && !f.failed()) {
    m.msg_control = ctl;
    m.msg_controllen = sizeof ctl;
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
  }
  if (sendmsg(sock_, &m, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof rep)) return false;
  return WriteAll(sock_, body.data(), body.size());
}

// The engine sends nothing while it waits for a reply, so readable means EOF.
bool Helper::PeerGone(int timeoutMs) {
  pollfd p{sock_, POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, timeoutMs) <= 0) return false;
  char c;
  return (p.revents & (POLLHUP | POLLRDHUP | POLLERR)) ||
         recv(sock_, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

// Tests kill the engine here; returns false when it went away meanwhile.
bool Helper::Hold(int64_t point) {
  if (holdPoint_ != point || holdMs_ <= 0) return true;
  dprintf(2, "bgsnap-hold %s\n", point == kHoldInjecting ? "injecting" : "sysctl");
  return !PeerGone(static_cast<int>(holdMs_));
}

bool Helper::Call(long nr, std::initializer_list<long> a, long* r, Failure* f, bool hold) {
  long args[6] = {0, 0, 0, 0, 0, 0};
  int i = 0;
  for (long x : a) args[i++] = x;
  std::function<bool()> h;
  if (hold) h = [this] { return Hold(kHoldInjecting); };
  return fz_->RemoteSyscall(nr, args, r, f, h);
}

static std::string ThreadRecs(std::vector<ThreadState>& threads, Failure* f) {
  std::string out;
  for (ThreadState& t : threads) {
    if (!t.attached) continue;
    if (Ptrace(PTRACE_GETREGS, t.tid, &t.regs) != 0 || Ptrace(PTRACE_GETFPREGS, t.tid, &t.fpregs) != 0) {
      f->Set(errno, "ptrace(GETREGS) of thread " + std::to_string(t.tid));
      break;
    }
    ThreadRec r{};
    r.tid = t.tid;
    r.pendingSignal = t.pendingSignal;
    r.eventStop = t.eventStop;
    r.xstateLen = static_cast<uint32_t>(t.xstate.size());
    r.regs = t.regs;
    r.fpregs = t.fpregs;
    out.append(reinterpret_cast<const char*>(&r), sizeof r);
    out.append(reinterpret_cast<const char*>(t.xstate.data()), t.xstate.size());
  }
  return out;
}

static int SeccompMode(pid_t pid, pid_t tid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Seccomp:", 0) == 0) return atoi(line.c_str() + 8);
  }
  return -1;
}

// The injected syscalls would meet the injectee's seccomp filter, which may
// kill the target, send it SIGSYS, fail the call or wake its supervisor. As
// root it is suspended for that thread during the injection only, as CRIU does
// (PTRACE_O_SUSPEND_SECCOMP), and put back before the reply; our death drops
// it with the ptrace link.
bool Helper::SuspendSeccomp(pid_t tid, bool allowed, bool* suspended, Failure* f) {
  int mode = SeccompMode(pid_, tid);
  if (mode == 0) return true;
  std::string where = "thread " + std::to_string(tid) + " of process " + std::to_string(pid_) +
                      " runs under seccomp (Seccomp: " + std::to_string(mode) + ")";
  if (!allowed) {
    return f->Set(EPERM, where + " and suspending it is disabled: refused before anything was injected");
  }
  Failure why;
  if (!fz_->SetOptions(tid, kSeizeOptions | kSuspendSeccomp, &why)) {
    return f->Set(why.err, where + "; suspending it for our syscalls (PTRACE_O_SUSPEND_SECCOMP) failed (needs "
                                   "CAP_SYS_ADMIN, a tracer not itself under seccomp, and a kernel with "
                                   "CONFIG_CHECKPOINT_RESTORE): refused before anything was injected");
  }
  *suspended = true;
  return true;
}

bool Helper::OpFreeze(const FreezerReq& q) {
  fz_ = std::make_unique<Freezer>(pid_);
  Failure f;
  bool ok = fz_->Freeze(&f, static_cast<long>(q.a[0]), q.a[1] != 0);
  std::string out = ok ? ThreadRecs(fz_->threads(), &f) : "";
  ok = ok && !f.failed();
  int64_t v[4] = {fz_->rounds(), 0, 0, 0};
  if (!ok) fz_.reset();
  return Reply(f, v, out);
}

// /dev/userfaultfd (Linux 6.1+) gives a userfaultfd to whoever may open it,
// whatever the sysctl says. The path must be in the target's memory: a few
// bytes below the injection thread's red zone, put back right after.
long Helper::DevUffd(Failure* f) {
  struct stat st;
  if (stat("/dev/userfaultfd", &st) != 0) return -ENOENT;
  uint64_t sp = 0;
  if (!fz_->InjecteeSp(&sp)) return -ESRCH;
  char path[32] = "/dev/userfaultfd", old[32];
  uint64_t at = (sp - 128 - sizeof path) & ~15ull;
  iovec l{old, sizeof old}, r{reinterpret_cast<void*>(at), sizeof old};
  if (process_vm_readv(pid_, &l, 1, &r, 1, 0) != sizeof old) return -EFAULT;
  iovec lp{path, sizeof path};
  if (process_vm_writev(pid_, &lp, 1, &r, 1, 0) != sizeof path) return -EFAULT;
  long dev = -1, fd = -1, ignored;
  Call(SYS_openat, {AT_FDCWD, static_cast<long>(at), O_RDWR | O_CLOEXEC}, &dev, f);
  bool restored = process_vm_writev(pid_, &l, 1, &r, 1, 0) == sizeof old;
  if (!restored) f->Set(errno, "restoring the target's stack bytes below its red zone");
  if (dev < 0 || f->failed()) return dev < 0 ? dev : -EIO;
  Call(SYS_ioctl, {dev, static_cast<long>(USERFAULTFD_IOC_NEW), O_CLOEXEC | O_NONBLOCK}, &fd, f);
  Call(SYS_close, {dev}, &ignored, f);
  if (f->failed() && fd >= 0) Call(SYS_close, {fd}, &ignored, f), fd = -EIO;
  return fd;
}

// userfaultfd() runs with the target's credentials. In order: the plain call
// (a privileged target, or the sysctl already 1), /dev/userfaultfd, and only
// then, as root, the sysctl opened for that one call and closed again. We never
// use UFFD_USER_MODE_ONLY: it crashed targets through the kernel's rseq update.
bool Helper::OpenUffd(long* fd, int64_t* via, Failure* f) {
  *via = kViaSyscall;
  if (!Call(SYS_userfaultfd, {O_CLOEXEC | O_NONBLOCK}, fd, f, true)) return false;
  if (*fd != -EPERM) return true;
  long dev = DevUffd(f);
  if (f->failed()) return false;
  if (dev >= 0) {
    *fd = dev, *via = kViaDev;
    return true;
  }
  if (geteuid() != 0 || ReadUffdSysctl() != 0 || !WriteUffdSysctl(1)) return true;
  *via = kViaSysctl;
  bool stay = Hold(kHoldSysctl);
  if (stay) Call(SYS_userfaultfd, {O_CLOEXEC | O_NONBLOCK}, fd, f);
  if (!WriteUffdSysctl(0)) f->Set(errno, "restoring vm.unprivileged_userfaultfd to 0");
  if (!stay) return f->Set(ECONNRESET, "the capture went away with the sysctl open; restored");
  return !f->failed();
}

// The uffd comes to us by pidfd_getfd and goes on to the engine by SCM_RIGHTS;
// the target keeps no copy, so the engine's death always releases protection.
bool Helper::OpInjectUffd(const FreezerReq& q) {
  Failure f;
  int64_t v[4] = {0, -1, 0, 0};
  long remote = -1, ignored;
  int local = -1;
  holdPoint_ = q.a[2], holdMs_ = q.a[3];
  if (!fz_) f.Set(ESRCH, "inject before freeze");
  if (!f.failed()) fz_->stepTimeoutMs = q.a[4] > 0 ? static_cast<uint32_t>(q.a[4]) : 2000;
  pid_t tid = f.failed() ? 0 : fz_->InjecteeTid();
  bool suspended = false;
  if (!f.failed() && fz_->FindSyscallInsn(q.a[0], q.a[1], &f) &&
      SuspendSeccomp(tid, q.a[6] != 0, &suspended, &f) && q.a[5]) {
    Call(SYS_pause, {}, &ignored, &f);  // tests: a call that never returns by itself
  }
  if (!f.failed() && OpenUffd(&remote, &v[0], &f) && remote < 0) {
    f.Set(static_cast<int>(-remote), "the target could not create a userfaultfd (seccomp filter, "
                                     "or vm.unprivileged_userfaultfd=0 for a non-root target "
                                     "that cannot open /dev/userfaultfd, and we are not root)");
  }
  if (remote >= 0) {
    int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
    local = pidfd < 0 ? -1 : static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, remote, 0));
    if (local < 0) f.Set(errno, "pidfd_getfd of the injected userfaultfd");
    if (pidfd >= 0) close(pidfd);
    Call(SYS_close, {remote}, &ignored, &f);
  }
  if (suspended) fz_->SetOptions(tid, kSeizeOptions, &f);  // the filter is in force again
  v[2] = suspended;
  bool sent = f.err != ECONNRESET && Reply(f, v, "", local);
  if (local >= 0) close(local);
  return sent;
}

bool Helper::Dispatch(const FreezerReq& q) {
  Failure f;
  int64_t v[4] = {0, 0, 0, 0};
  switch (q.op) {
    case kOpFreeze: return OpFreeze(q);
    case kOpInjectUffd: return OpInjectUffd(q);
    case kOpThreads: {
      std::string out;
      if (!fz_) f.Set(ESRCH, "threads before freeze");
      else out = ThreadRecs(fz_->threads(), &f);
      return Reply(f, v, out);
    }
    case kOpDetach:
      fz_.reset();  // detaches every thread
      return Reply(f, v, "");
    default:
      f.Set(EINVAL, "unknown freezer request " + std::to_string(q.op));
      return Reply(f, v, "");
  }
}

int Helper::Serve() {
  FreezerReq q;
  int64_t hello[4] = {0, 0, 0, 0};
  bool up = Reply(Failure(), hello, "");
  while (up && ReadAll(sock_, &q, sizeof q) && Dispatch(q)) {
  }
  fz_.reset();  // the engine is gone: every thread resumes, held signals re-delivered
  return 0;
}

}  // namespace bgsnap

// bgsnap-freezer PID: the socket to the engine is fd 3.
int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: bgsnap-freezer PID (spawned by the capture engine, socket on fd 3)\n");
    return 2;
  }
  // Signals aimed at the capture (Ctrl-C, its process group) must not kill us
  // mid-injection; the engine's death reaches us as EOF instead.
  for (int s : {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGQUIT}) signal(s, SIG_IGN);
  setsid();
  sched_param sp{sched_get_priority_min(SCHED_FIFO)};
  sched_setscheduler(0, SCHED_FIFO, &sp);  // the freeze is the target's pause; best effort
  return bgsnap::Helper(3, static_cast<pid_t>(atoi(argv[1]))).Serve();
}
