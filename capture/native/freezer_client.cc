// Spawning and talking to the bgsnap-freezer helper. It sits next to our addon
// (build/Release/bgsnap-freezer), built from the same freeze/inject sources.
#include "freezer_client.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

extern char** environ;  // at global scope: posix_spawn passes ours on

namespace bgsnap {

static std::string HelperPath() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&HelperPath), &info) || !info.dli_fname) return "";
  std::string self = info.dli_fname;
  size_t slash = self.rfind('/');
  return (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) + "/bgsnap-freezer";
}

bool FreezerClient::Start(Failure* f) {
  std::string path = HelperPath();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return f->Set(errno, "socketpair for the freezer helper");
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  // Never our stdout: it may be the snapshot stream. dup2 clears CLOEXEC on fd 3.
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, sv[1], 3);
  // Our stderr for its messages, even where it is close-on-exec here (Node's is).
  int err2 = fcntl(2, F_DUPFD_CLOEXEC, 10);
  if (err2 >= 0) posix_spawn_file_actions_adddup2(&fa, err2, 2);
  std::string pid = std::to_string(pid_);
  char* argv[] = {const_cast<char*>(path.c_str()), const_cast<char*>(pid.c_str()), nullptr};
  int err = posix_spawn(&helper_, path.c_str(), &fa, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (err2 >= 0) close(err2);
  close(sv[1]);
  if (err != 0) {
    close(sv[0]);
    helper_ = -1;
    return f->Set(err, "starting the freezer helper " + path);
  }
  sock_ = sv[0];
  // Its hello: loading and starting it (milliseconds on a busy machine) must
  // not count as, or lengthen, the target's pause.
  FreezerRep rep{};
  std::string body;
  return Receive(&rep, &body, nullptr, f);
}

void FreezerClient::Stop() {
  if (sock_ >= 0) close(sock_);
  sock_ = -1;
  if (helper_ > 0) waitpid(helper_, nullptr, 0);  // it detaches everything, then exits
  helper_ = -1;
}

bool FreezerClient::Lost(Failure* f, const char* what) {
  lost_ = true;
  return f->Set(EPIPE, std::string("the freezer helper died or stopped answering (") + what +
                           "); the kernel released its tracees");
}

bool FreezerClient::WaitReadable(const std::function<void()>& idle, int idleFd, Failure* f) {
  double deadline = NowMs() + 120000;
  for (;;) {
    pollfd p[2] = {{sock_, POLLIN, 0}, {idleFd, POLLIN, 0}};
    int n = poll(p, idle && idleFd >= 0 ? 2 : 1, idle ? 1 : 1000);
    if (n < 0 && errno != EINTR) return f->Set(errno, "poll on the freezer helper socket");
    if (n > 0 && p[0].revents) return true;
    if (idle) idle();
    if (NowMs() > deadline) return Lost(f, "no answer in 120 s");
  }
}

bool FreezerClient::Call(const FreezerReq& q, FreezerRep* rep, std::string* body, int* fd,
                         Failure* f, const std::function<void()>& idle, int idleFd) {
  if (sock_ < 0 || lost_) return Lost(f, "not running");
  if (send(sock_, &q, sizeof q, MSG_NOSIGNAL) != sizeof q) return Lost(f, "request");
  return Receive(rep, body, fd, f, idle, idleFd);
}

bool FreezerClient::Receive(FreezerRep* rep, std::string* body, int* fd, Failure* f,
                            const std::function<void()>& idle, int idleFd) {
  if (!WaitReadable(idle, idleFd, f)) return false;
  iovec iov{rep, sizeof *rep};
  char ctl[CMSG_SPACE(sizeof(int))] = {0};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = ctl;
  m.msg_controllen = sizeof ctl;
  if (recvmsg(sock_, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC) != sizeof *rep) return Lost(f, "reply");
  cmsghdr* c = CMSG_FIRSTHDR(&m);
  if (c && c->cmsg_type == SCM_RIGHTS && fd) memcpy(fd, CMSG_DATA(c), sizeof *fd);
  if (rep->len > kFreezerMaxMsg) return Lost(f, "oversized reply");
  body->resize(rep->len);
  if (rep->len && recv(sock_, &(*body)[0], rep->len, MSG_WAITALL) != rep->len) {
    return Lost(f, "reply body");
  }
  if (rep->err) return f->Set(rep->err, *body);
  return true;
}

bool FreezerClient::Freeze(long seizeOptions, bool injectable, Failure* f,
                           const std::function<void()>& idle, int idleFd) {
  FreezerReq q{kOpFreeze, 0, {seizeOptions, injectable, 0, 0, 0, 0, 0, 0}};
  FreezerRep rep{};
  std::string body;
  threads_.clear();
  if (!Call(q, &rep, &body, nullptr, f, idle, idleFd)) return false;
  rounds_ = static_cast<int>(rep.v[0]);
  return ParseThreads(body, f);
}

bool FreezerClient::ReadThreads(Failure* f) {
  FreezerReq q{kOpThreads, 0, {0, 0, 0, 0, 0, 0, 0, 0}};
  FreezerRep rep{};
  std::string body;
  threads_.clear();
  return Call(q, &rep, &body, nullptr, f) && ParseThreads(body, f);
}

bool FreezerClient::ParseThreads(const std::string& body, Failure* f) {
  for (size_t at = 0; at + sizeof(ThreadRec) <= body.size();) {
    ThreadRec r;
    memcpy(&r, body.data() + at, sizeof r);
    at += sizeof r;
    if (r.xstateLen > body.size() - at) return Lost(f, "truncated thread record");
    ThreadState t;
    t.tid = r.tid;
    t.attached = t.stopped = true;
    t.eventStop = r.eventStop;
    t.pendingSignal = r.pendingSignal;
    t.regs = r.regs;
    t.fpregs = r.fpregs;
    t.xstate.assign(body.begin() + at, body.begin() + at + r.xstateLen);
    at += r.xstateLen;
    threads_.push_back(std::move(t));
  }
  return true;
}

bool FreezerClient::InjectUffd(const InjectRequest& r, int* fd, int* via, bool* seccompSuspended,
                               Failure* f) {
  FreezerReq q{kOpInjectUffd, 0, {static_cast<int64_t>(r.vdsoStart), static_cast<int64_t>(r.vdsoEnd),
               r.holdPoint, r.holdMs, r.stepTimeoutMs, r.testStuck, r.suspendSeccomp, 0}};
  FreezerRep rep{};
  std::string body;
  *fd = -1;
  if (!Call(q, &rep, &body, fd, f)) return false;
  *via = static_cast<int>(rep.v[0]);
  *seccompSuspended = rep.v[2] != 0;
  return *fd >= 0 || f->Set(EPROTO, "the freezer helper sent no userfaultfd");
}

bool FreezerClient::Detach(Failure* f) {
  FreezerReq q{kOpDetach, 0, {0, 0, 0, 0, 0, 0, 0, 0}};
  FreezerRep rep{};
  std::string body;
  return Call(q, &rep, &body, nullptr, f);
}

}  // namespace bgsnap
