// The wire protocol between the capture engine (in the Node process) and its
// tracer, the bgsnap-freezer helper process, over a SOCK_STREAM socketpair.
// The helper is the only ptrace tracer, so SIGKILL of the Node process never
// leaves a thread with injected registers: the helper sees EOF and rolls back.
// The helper first sends an empty reply (hello) once it is up. Then
// fixed-size structs, one request then one reply; a reply's
// variable part (thread records, or an error sentence) follows it; the
// uffd travels back as SCM_RIGHTS on the header.
#pragma once
#include <stdint.h>
#include <sys/user.h>

namespace bgsnap {

enum FreezerOp : uint32_t {
  kOpFreeze = 1,      // a[0]: extra PTRACE_SEIZE options; a[1]: a thread must be injectable
                      // reply: v[0] rounds, then ThreadRecs
  kOpInjectUffd = 2,  // a[0..1]: vDSO range; a[2]: hold point; a[3]: hold ms;
                      // a[4]: step timeout ms; a[5]: test: inject a call that blocks;
                      // a[6]: seccomp may be suspended for our calls
                      // reply: v[0] via (UffdVia), v[2] seccomp suspended; fd as SCM_RIGHTS
  // 3 was a generic remote syscall, never used by the engine: removed, so the
  // helper injects nothing but the userfaultfd calls.
  kOpDetach = 4,      // resume every thread, re-delivering held signals
  kOpThreads = 5,     // every thread's registers as they are now: ThreadRecs
};

enum UffdVia : int64_t { kViaSyscall = 1, kViaDev = 2, kViaSysctl = 3 };
enum HoldPoint : int64_t { kHoldNone = 0, kHoldInjecting = 1, kHoldSysctl = 2 };

struct FreezerReq {
  uint32_t op;
  uint32_t pad;
  int64_t a[8];
};

struct FreezerRep {
  int32_t err;  // errno; the variable part is then the failure's sentence
  uint32_t len; // bytes following this header
  int64_t v[4];
};

// One per thread in a freeze reply, followed by xstateLen bytes of
// NT_X86_XSTATE (0 until the freeze reads it).
struct ThreadRec {
  int32_t tid;
  int32_t pendingSignal;
  uint32_t eventStop;
  uint32_t xstateLen;
  user_regs_struct regs;
  user_fpregs_struct fpregs;
};

constexpr size_t kFreezerMaxMsg = 4 << 20;  // thread records of ~4000 threads with xstate

}  // namespace bgsnap
