// The engine's side of the bgsnap-freezer helper (freezer_main.cc): the helper
// process is the target's only tracer; we keep the userfaultfd and all page
// work. Closing the socket (or our death) makes the helper roll back and exit.
#pragma once
#include <sys/types.h>

#include <functional>
#include <string>
#include <vector>

#include "capture.h"
#include "freezer_proto.h"

namespace bgsnap {

struct InjectRequest {
  uint64_t vdsoStart = 0, vdsoEnd = 0;
  int64_t holdPoint = kHoldNone, holdMs = 0, stepTimeoutMs = 0, testStuck = 0;
  bool suspendSeccomp = true;  // false: refuse a seccomp target, as a non-root tracer must
};

class FreezerClient {
 public:
  explicit FreezerClient(pid_t pid) : pid_(pid) {}
  ~FreezerClient() { Stop(); }
  bool Start(Failure* f);
  void Stop();  // close the socket and reap the helper (it detaches first)

  // While waiting, `idle` runs whenever `idleFd` is readable and at least
  // every millisecond: threads blocked on our userfaultfd stop only once served.
  bool Freeze(long seizeOptions, bool injectable, Failure* f,
              const std::function<void()>& idle = nullptr, int idleFd = -1);
  bool InjectUffd(const InjectRequest& r, int* fd, int* via, bool* seccompSuspended, Failure* f);
  bool Detach(Failure* f);
  // Registers as they are now: injection moves a thread out of an rseq section.
  bool ReadThreads(Failure* f);
  // The helper died or stopped answering: whatever it held is no longer held.
  bool lost() const { return lost_; }

  std::vector<ThreadState>& threads() { return threads_; }
  int rounds() const { return rounds_; }

 private:
  bool Call(const FreezerReq& q, FreezerRep* rep, std::string* body, int* fd, Failure* f,
            const std::function<void()>& idle = nullptr, int idleFd = -1);
  bool Receive(FreezerRep* rep, std::string* body, int* fd, Failure* f,
               const std::function<void()>& idle = nullptr, int idleFd = -1);
  bool WaitReadable(const std::function<void()>& idle, int idleFd, Failure* f);
  bool Lost(Failure* f, const char* what);
  bool ParseThreads(const std::string& body, Failure* f);

  pid_t pid_;
  pid_t helper_ = -1;
  int sock_ = -1;
  bool lost_ = false;
  int rounds_ = 0;
  std::vector<ThreadState> threads_;
};

}  // namespace bgsnap
