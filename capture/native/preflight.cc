// Checks that refuse a target bgsnap cannot capture safely, made before anything
// is injected: a non-dumpable process (its owner asked to keep its memory out of
// cores and debuggers), a seccomp filter that would act on the syscalls we inject
// (unless the tracer can suspend it for them), and mappings too large for a block.
#include <linux/capability.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "procfs.h"
#include "session.h"

namespace bgsnap {


// A field of /proc/.../status as up to four numbers ("Uid:", "Seccomp:").
static int StatusField(const std::string& status, const char* key, long out[4]) {
  size_t at = status.find(std::string("\n") + key);
  if (at == std::string::npos) return 0;
  const char* p = status.c_str() + at + 1 + strlen(key);
  int n = 0;
  for (char* end; n < 4; n++, p = end) {
    out[n] = strtol(p, &end, 10);
    if (end == p) break;
  }
  return n;
}

// The kernel lets a caller whose real ids match the target's, without
// CAP_SYS_PTRACE in effect, look at it (ptrace_may_access) only if the target is
// dumpable, and nothing in /proc tells. So a short-lived thread (credentials
// are per thread at the syscall level) takes the target's ids as its real ids,
// keeping euid (so neither its capabilities nor our own dumpability change),
// drops CAP_SYS_PTRACE from its effective set (keeping it permitted, so the
// capability-subset check against a root target still passes), and asks for the
// target's robust futex list, a harmless read checked with real credentials
// (/proc files check fs credentials against effective capabilities, which a
// root target's full set always fails). 1 dumpable, 0 not, -1 cannot tell.
static int ProbeDumpable(pid_t pid, uid_t uid, gid_t gid) {
  int result = -1;
  std::thread probe([&] {
    if (syscall(SYS_setresgid, gid, -1, -1) != 0 || syscall(SYS_setresuid, uid, -1, -1) != 0) return;
    __user_cap_header_struct h{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) != 0) return;
    d[CAP_SYS_PTRACE / 32].effective &= ~(1u << (CAP_SYS_PTRACE % 32));
    if (syscall(SYS_capset, &h, d) != 0) return;
    void* head = nullptr;
    size_t len = 0;
    long r = syscall(SYS_get_robust_list, pid, &head, &len);
    result = r == 0 ? 1 : errno == EPERM ? 0 : -1;
  });
  probe.join();
  return result;
}

static uint64_t CapPrm(const std::string& status) {
  size_t at = status.find("\nCapPrm:");
  return at == std::string::npos ? ~0ull : strtoull(status.c_str() + at + 8, nullptr, 16);
}

bool Session::CheckDumpable(Failure* f) {
  if (opts_.allowNonDumpable) return true;
  std::string status, who = "process " + std::to_string(pid_);
  long u[4] = {0}, g[4] = {0};
  if (!ReadWhole("/proc/" + std::to_string(pid_) + "/status", &status)) return f->Set(ESRCH, who + " does not exist");
  if (StatusField(status, "Uid:", u) < 3 || StatusField(status, "Gid:", g) < 3) return true;  // a kernel thread: ptrace says no
  const char* hint = "; --allow-nondumpable (allowNonDumpable) captures it anyway";
  if (u[0] != u[1] || u[1] != u[2] || g[0] != g[1] || g[1] != g[2]) {
    return f->Set(EPERM, who + " may be non-dumpable: its real, effective and saved user or group ids "
                              "differ (a set-user-ID program, or one that changed ids: the kernel makes "
                              "those non-dumpable), so bgsnap cannot tell; refused" + hint);
  }
  // The probe would also fail on a target holding capabilities we lack (a
  // kernel thread, a process from outside our container): then we cannot tell.
  std::string self;
  ReadWhole("/proc/self/status", &self);
  if (CapPrm(status) & ~CapPrm(self)) return true;
  if (ProbeDumpable(pid_, static_cast<uid_t>(u[1]), static_cast<gid_t>(g[1])) != 0) return true;
  return f->Set(EPERM, who + " is not dumpable (prctl(PR_SET_DUMPABLE, 0), as ssh-agent and "
                            "gpg-agent do to keep their keys out of cores and debuggers): refused" + hint);
}

// The seccomp suspension for the injected syscalls is the freezer helper's
// (freezer_main.cc: SuspendSeccomp): it is the tracer.

// Block page indexes are 32-bit (format/SPEC.md), and the bitmaps' arithmetic
// stays below 2^32 only up to 2^31 pages: 8 TiB. A larger writable mapping (a
// sanitizer's shadow) is refused by name; larger inaccessible ones are skipped.
bool CheckBlockSize(const MapEntry& m, Failure* f) {
  if ((m.end - m.start) / kPage <= kMaxBlockPages) return true;
  char range[64];
  snprintf(range, sizeof range, "%llx-%llx", (unsigned long long)m.start, (unsigned long long)m.end);
  return f->Set(EFBIG, std::string("mapping ") + range + " " + m.perms + (m.path.empty() ? "" : " " + m.path) +
                           " is " + std::to_string((m.end - m.start) >> 30) + " GiB: writable mappings over " +
                           std::to_string((kMaxBlockPages * kPage) >> 40) + " TiB (e.g. a sanitizer's shadow) cannot be captured");
}

}  // namespace bgsnap
