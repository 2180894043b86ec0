// captureInfo(handle): everything known about a capture, for the process-state
// blob, the stats and the tests. Registers are the raw x86_64 user_regs_struct
// (216 bytes), user_fpregs_struct (512 bytes) and the XSAVE area (NT_X86_XSTATE),
// as a core file's notes want.
#include "addon.h"
#include "session.h"

namespace bgsnap {

static Napi::Buffer<uint8_t> Bytes(Napi::Env env, const void* p, size_t n) {
  return Napi::Buffer<uint8_t>::Copy(env, static_cast<const uint8_t*>(p), n);
}

static Napi::Object FreezeObject(Napi::Env env, const FreezeStats& fz) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("totalMs", fz.totalMs);
  o.Set("stops", fz.stops);
  o.Set("armMs", fz.armMs);
  o.Set("snapshotMs", fz.snapshotMs);
  o.Set("preProtectMs", fz.preProtectMs);
  o.Set("preFaults", static_cast<double>(fz.preFaults));
  o.Set("preRounds", static_cast<double>(fz.preRounds));
  o.Set("reprotectRanges", static_cast<double>(fz.reprotectRanges));
  o.Set("reprotectPages", static_cast<double>(fz.reprotectPages));
  o.Set("seizeMs", fz.seizeMs);
  o.Set("injectMs", fz.injectMs);
  o.Set("registerMs", fz.registerMs);
  o.Set("protectMs", fz.protectMs);
  o.Set("pagemapMs", fz.pagemapMs);
  o.Set("copyMs", fz.copyMs);
  o.Set("detachMs", fz.detachMs);
  o.Set("threads", fz.threads);
  o.Set("rounds", fz.rounds);
  o.Set("sysctlToggled", fz.sysctlToggled);
  o.Set("seccompSuspended", fz.seccompSuspended);
  o.Set("smapsMs", fz.smapsMs);
  o.Set("smapsFrozenMs", fz.smapsFrozenMs);
  o.Set("smapsReread", fz.smapsReread);
  o.Set("uffdVia", fz.uffdVia);
  o.Set("snapshotTime", fz.snapshotTime);
  o.Set("faultsBefore", static_cast<double>(fz.faultsBefore));
  o.Set("pass", fz.pass);
  o.Set("dirtyBefore", static_cast<double>(fz.dirtyBefore));
  o.Set("syncFinish", fz.syncFinish);
  o.Set("moveStops", fz.moveStops);
  o.Set("moveMaxMs", fz.moveMaxMs);
  o.Set("moveMs", fz.moveMs);
  o.Set("stopPages", static_cast<double>(fz.stopPages));
  o.Set("heldPages", static_cast<double>(fz.heldPages));
  return o;
}

static Napi::Object CountersObject(Napi::Env env, Session& s) {
  Counters& c = s.counters;
  Napi::Object o = Napi::Object::New(env);
  auto set = [&](const char* k, const std::atomic<uint64_t>& v) {
    o.Set(k, static_cast<double>(v.load()));
  };
  set("scanPages", c.scanPages);
  set("faultPages", c.faultPages);
  set("copiedPages", c.copiedPages);
  set("zeroPages", c.zeroPages);
  set("untouchedPages", c.untouchedPages);
  set("discarded", c.discarded);
  set("bytes", c.bytes);
  set("faults", c.faults);
  set("spuriousFaults", c.spurious);
  set("eagain", c.eagain);
  set("removeEvents", c.removeEvents);
  set("unmapEvents", c.unmapEvents);
  set("remapEvents", c.remapEvents);
  set("batches", c.batches);
  set("bufferWaits", c.bufferWaits);
  set("scanWaitUs", c.scanWaitUs);
  set("saverCpuUs", c.saverCpuUs);
  set("saverWallUs", c.saverWallUs);
  set("rollbacks", c.rollbacks);
  set("unregistered", c.unregistered);
  set("lostProtection", c.lostProtection);
  double p50, p99, max;
  size_t n;
  s.FaultWaits(&p50, &p99, &max, &n);
  o.Set("faultWaitP50Ms", p50);
  o.Set("faultWaitP99Ms", p99);
  o.Set("faultWaitMaxMs", max);
  o.Set("faultWaitSamples", static_cast<double>(n));
  return o;
}

static Napi::Array MapsArray(Napi::Env env, Session& s) {
  Napi::Array a = Napi::Array::New(env, s.maps.size());
  for (size_t i = 0; i < s.maps.size(); i++) {
    const MapEntry& m = s.maps[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("start", static_cast<double>(m.start));
    o.Set("end", static_cast<double>(m.end));
    o.Set("perms", m.perms);
    o.Set("offset", static_cast<double>(m.offset));
    o.Set("dev", m.dev);
    o.Set("inode", static_cast<double>(m.inode));
    o.Set("path", m.path);
    o.Set("block", m.block);
    o.Set("how", m.how);
    a.Set(static_cast<uint32_t>(i), o);
  }
  return a;
}

static Napi::Array BlocksArray(Napi::Env env, Session& s) {
  Napi::Array a = Napi::Array::New(env, s.blocks.size());
  for (size_t i = 0; i < s.blocks.size(); i++) {
    const Block& b = s.blocks[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", b.name);
    o.Set("address", static_cast<double>(b.start));
    o.Set("length", static_cast<double>(b.length));
    o.Set("map", b.map);
    o.Set("protected", b.kind == BlockKind::kProtected);
    o.Set("thp", b.thp);
    o.Set("dead", b.dead);  // chains: gone from the layout
    a.Set(static_cast<uint32_t>(i), o);
  }
  return a;
}

static Napi::Array ThreadsArray(Napi::Env env, Session& s) {
  Napi::Array a = Napi::Array::New(env, s.threads.size());
  for (size_t i = 0; i < s.threads.size(); i++) {
    const ThreadState& t = s.threads[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("tid", t.tid);
    o.Set("regs", Bytes(env, &t.regs, sizeof t.regs));
    o.Set("fpregs", Bytes(env, &t.fpregs, sizeof t.fpregs));
    o.Set("xstate", Bytes(env, t.xstate.data(), t.xstate.size()));
    o.Set("pendingSignal", t.pendingSignal);
    a.Set(static_cast<uint32_t>(i), o);
  }
  return a;
}

static const char* StateName(int st) {
  switch (st) {
    case Session::kFreezing: return "freezing";
    case Session::kRunning: return "running";
    case Session::kDone: return "done";
    default: return "failed";
  }
}

Napi::Value CaptureInfo(const Napi::CallbackInfo& info, Session& s) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  int st = s.state();
  o.Set("state", StateName(st));
  o.Set("pid", s.pid());
  if (st == Session::kFailed) {
    Failure f = s.failure();
    o.Set("error", ErrnoError(env, f.err, f.what).Value());
  }
  o.Set("counters", CountersObject(env, s));
  o.Set("generation", s.generation());  // chains: the last generation frozen (1 after startCapture)
  if (!s.frozen()) return o;  // the rest is written by the capture thread until then
  o.Set("freeze", FreezeObject(env, s.freeze));
  o.Set("maps", MapsArray(env, s));
  o.Set("blocks", BlocksArray(env, s));
  o.Set("threads", ThreadsArray(env, s));
  o.Set("auxv", Bytes(env, s.auxv.data(), s.auxv.size()));
  o.Set("cmdline", Bytes(env, s.cmdline.data(), s.cmdline.size()));
  o.Set("exe", s.exe);
  o.Set("status", s.status);
  o.Set("mapsText", s.mapsText);
  if (st >= Session::kDone) o.Set("seconds", s.seconds);
  return o;
}

}  // namespace bgsnap
