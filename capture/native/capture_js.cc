// JavaScript surface of the process capture engine:
//   startCapture(pid, {bufferMb, rateLimitMBps, stallTimeoutMs}) -> Promise<handle>
//       resolves once the target was frozen, protected and resumed (the
//       snapshot point), rejects with an errno `code` if that failed;
//   nextBuffer(handle) -> Promise<{id, block, index, zero, data} | null>
//       a filled batch (views of native memory: release it when written;
//       crcs: the CRC-32 of each data page, taken by the saver),
//       or null when every page was saved;
//   releaseBuffer(handle, id), takeDiscards(handle), captureInfo(handle),
//   abortCapture(handle), closeCapture(handle).
// The capture thread never waits on JavaScript: it only queues wake-ups
// through a thread-safe function; JavaScript looks at the session when it runs.
#include <map>

#include "addon.h"
#include "session.h"

namespace bgsnap {

namespace {

struct Entry {
  std::shared_ptr<Session> session;
  std::unique_ptr<Napi::Promise::Deferred> start, next;
  std::unique_ptr<Napi::Promise::Deferred> gen;  // chains: nextGeneration's promise
  int wantGen = 0;
  Napi::ThreadSafeFunction tsfn;
};

std::map<uint32_t, Entry> entries;  // JS thread only
uint32_t nextId = 1;

Entry* Find(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsNumber()) return nullptr;
  auto it = entries.find(info[0].As<Napi::Number>().Uint32Value());
  return it == entries.end() ? nullptr : &it->second;
}

Napi::Value BadHandle(Napi::Env env) {
  Napi::TypeError::New(env, "unknown capture handle").ThrowAsJavaScriptException();
  return env.Undefined();
}

void Finalize(Napi::Env, void*, std::shared_ptr<Memory>* keep) { delete keep; }

// Views of native batch memory. Each holds a reference on the pool memory, so
// a view that outlives the capture never points at freed memory.
Napi::Object BatchObject(Napi::Env env, Session& s, Batch* bt) {
  auto keep = [&] { return new std::shared_ptr<Memory>(s.pool.memory); };
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", bt->id);
  o.Set("block", bt->block);
  auto ib = Napi::ArrayBuffer::New(env, bt->index, bt->count * 4, Finalize, keep());
  o.Set("index", Napi::Uint32Array::New(env, bt->count, ib, 0));
  auto zb = Napi::ArrayBuffer::New(env, bt->zero, bt->count, Finalize, keep());
  o.Set("zero", Napi::Uint8Array::New(env, bt->count, zb, 0));
  auto cb = Napi::ArrayBuffer::New(env, bt->crcs, bt->dataPages * 4, Finalize, keep());
  o.Set("crcs", Napi::Uint32Array::New(env, bt->dataPages, cb, 0));
  size_t bytes = uint64_t(bt->dataPages) * kPage;
  o.Set("data", bytes ? Napi::Buffer<uint8_t>::New(env, bt->data, bytes, Finalize, keep())
                      : Napi::Buffer<uint8_t>::New(env, 0));
  return o;
}

void Reject(Napi::Env env, std::unique_ptr<Napi::Promise::Deferred>& d, const Failure& f) {
  d->Reject(ErrnoError(env, f.err, f.what).Value());
  d.reset();
}

// Runs on the JS thread whenever the capture thread signalled.
void OnWake(Napi::Env env, uint32_t id) {
  auto it = entries.find(id);
  if (it == entries.end()) return;
  Entry& e = it->second;
  Session& s = *e.session;
  int st = s.state();
  int genDone = s.generationDone();  // read before TakeReady: set only after the generation's last batch
  if (e.start && (s.frozen() || st >= Session::kDone)) {
    if (s.frozen()) e.start->Resolve(Napi::Number::New(env, id)), e.start.reset();
    else Reject(env, e.start, s.failure());
  }
  if (e.gen && s.frozen() && s.generation() >= e.wantGen) {
    e.gen->Resolve(Napi::Number::New(env, s.generation()));
    e.gen.reset();
  } else if (e.gen && st >= Session::kDone) {
    Failure ended = s.failure();
    if (!ended.failed()) ended.Set(ECANCELED, "the capture ended before generation " + std::to_string(e.wantGen));
    Reject(env, e.gen, ended);
  }
  if (!e.next) return;
  if (st == Session::kFailed) return Reject(env, e.next, s.failure());
  if (Batch* bt = s.pool.TakeReady()) {
    e.next->Resolve(BatchObject(env, s, bt));
    e.next.reset();
  } else if (st == Session::kDone || (genDone > 0 && genDone >= s.generation() && s.frozen())) {
    e.next->Resolve(env.Null());
    e.next.reset();
  }
}

Options ParseOptions(const Napi::Value& v) {
  Options o;  // capture.h's defaults, for what JavaScript leaves out
  if (!v.IsObject()) return o;
  Napi::Object obj = v.As<Napi::Object>();
  auto num = [&](const char* k, double dflt) {
    Napi::Value x = obj.Get(k);
    return x.IsNumber() ? x.As<Napi::Number>().DoubleValue() : dflt;
  };
  o.bufferMb = static_cast<uint32_t>(num("bufferMb", o.bufferMb));
  o.rateLimitMBps = num("rateLimitMBps", o.rateLimitMBps);
  o.stallMs = static_cast<uint32_t>(num("stallTimeoutMs", o.stallMs));
  o.holdMs = static_cast<uint32_t>(num("testHoldMs", o.holdMs));
  o.stepTimeoutMs = static_cast<uint32_t>(num("injectTimeoutMs", o.stepTimeoutMs));
  Napi::Value stuck = obj.Get("testStuckInjection");
  o.testStuckInjection = stuck.IsBoolean() && stuck.As<Napi::Boolean>().Value();
  o.frozenReadMs = static_cast<uint32_t>(num("frozenReadTimeoutMs", o.frozenReadMs));
  o.maxUnregisters = static_cast<uint32_t>(num("testMaxUnregisters", o.maxUnregisters));
  o.retryOnlyMs = static_cast<uint32_t>(num("testRetryOnlyMs", o.retryOnlyMs));
  Napi::Value pre = obj.Get("preProtect");
  if (pre.IsBoolean()) o.preProtect = pre.As<Napi::Boolean>().Value();
  Napi::Value dd = obj.Get("includeDontDump");
  if (dd.IsBoolean()) o.includeDontDump = dd.As<Napi::Boolean>().Value();
  Napi::Value at = obj.Get("testHoldAt");
  if (at.IsString()) o.holdAt = at.As<Napi::String>().Utf8Value();
  o.allowNonDumpable = obj.Get("allowNonDumpable").ToBoolean().Value();
  o.suspendSeccomp = !obj.Get("testNoSuspendSeccomp").ToBoolean().Value();
  o.chain = obj.Get("chain").ToBoolean().Value();
  o.preDirtyMinPages = static_cast<uint32_t>(num("chainPreProtectMinPages", o.preDirtyMinPages));
  o.precopy = obj.Get("precopy").ToBoolean().Value();
  if (o.precopy) o.chain = true;
  o.precopyFinalPages = static_cast<uint32_t>(num("precopyFinalPages", o.precopyFinalPages));
  o.precopyMaxPasses = static_cast<uint32_t>(num("precopyMaxPasses", o.precopyMaxPasses));
  o.precopyMoveMb = static_cast<uint32_t>(num("precopyMoveMb", o.precopyMoveMb));
  return o;
}

Napi::Value StartCapture(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) {
    Napi::TypeError::New(env, "startCapture(pid, options)").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  pid_t pid = info[0].As<Napi::Number>().Int32Value();
  uint32_t id = nextId++;
  Entry& e = entries[id];
  e.session = std::make_shared<Session>(pid, ParseOptions(info[1]));
  e.start = std::make_unique<Napi::Promise::Deferred>(env);
  Napi::Promise promise = e.start->Promise();
  auto noop = Napi::Function::New(env, [](const Napi::CallbackInfo&) {});
  auto tsfn = Napi::ThreadSafeFunction::New(env, noop, "bgsnap-capture", 0, 1);
  e.tsfn = tsfn;
  e.session->Start(
      [tsfn, id]() mutable {
        tsfn.NonBlockingCall([id](Napi::Env env, Napi::Function) { OnWake(env, id); });
      },
      [tsfn]() mutable { tsfn.Release(); });
  return promise;
}

Napi::Value NextBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Entry* e = Find(info);
  if (!e) return BadHandle(env);
  if (e->next) {
    Napi::Error::New(env, "nextBuffer: a call is already pending").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  e->next = std::make_unique<Napi::Promise::Deferred>(env);
  Napi::Promise p = e->next->Promise();
  OnWake(env, info[0].As<Napi::Number>().Uint32Value());
  return p;
}

// Chains: freeze the next generation; resolves with its number at its instant.
// Call it once nextBuffer returned null for the current one.
Napi::Value NextGeneration(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Entry* e = Find(info);
  if (!e) return BadHandle(env);
  if (e->gen || e->next) {
    Napi::Error::New(env, "nextGeneration: a call is already pending").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  e->gen = std::make_unique<Napi::Promise::Deferred>(env);
  e->wantGen = e->session->generation() + 1;
  Napi::Promise p = e->gen->Promise();
  e->session->RequestGeneration();
  OnWake(env, info[0].As<Napi::Number>().Uint32Value());
  return p;
}

Napi::Value ReleaseBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Entry* e = Find(info);
  if (!e) return BadHandle(env);
  return Napi::Boolean::New(env, e->session->pool.Release(info[1].As<Napi::Number>().Uint32Value()));
}

Napi::Value TakeDiscards(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Entry* e = Find(info);
  if (!e) return BadHandle(env);
  auto all = e->session->TakeDiscards();
  Napi::Array out = Napi::Array::New(env, all.size());
  for (size_t i = 0; i < all.size(); i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("block", all[i].first);
    auto idx = Napi::Uint32Array::New(env, all[i].second.size());
    memcpy(idx.Data(), all[i].second.data(), all[i].second.size() * 4);
    o.Set("index", idx);
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

Napi::Value AbortCapture(const Napi::CallbackInfo& info) {
  Entry* e = Find(info);
  if (!e) return BadHandle(info.Env());
  e->session->Abort();
  return info.Env().Undefined();
}

// Frees the session once its thread ended (waiting for it if needed).
Napi::Value CloseCapture(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Entry* e = Find(info);
  if (!e) return env.Undefined();
  e->session->Abort();
  if (!e->session->JoinFor(5000)) {
    // Still inside a kernel call after the abort: never block the JS thread on
    // it. The session stays alive for its thread (the watchdog still drops the
    // protection), and no longer keeps the event loop alive.
    new std::shared_ptr<Session>(e->session);
    e->tsfn.Unref(env);
  }
  Failure closed;
  closed.Set(ECANCELED, "capture closed");
  if (e->next) Reject(env, e->next, closed);
  if (e->start) Reject(env, e->start, closed);
  if (e->gen) Reject(env, e->gen, closed);
  entries.erase(info[0].As<Napi::Number>().Uint32Value());
  return env.Undefined();
}

}  // namespace

Napi::Value CaptureInfo(const Napi::CallbackInfo& info, Session& s);

static Napi::Value CaptureInfoJs(const Napi::CallbackInfo& info) {
  Entry* e = Find(info);
  if (!e) return BadHandle(info.Env());
  return CaptureInfo(info, *e->session);
}

void InitCapture(Napi::Env env, Napi::Object exports) {
  exports.Set("startCapture", Napi::Function::New(env, StartCapture, "startCapture"));
  exports.Set("nextBuffer", Napi::Function::New(env, NextBuffer, "nextBuffer"));
  exports.Set("nextGeneration", Napi::Function::New(env, NextGeneration, "nextGeneration"));
  exports.Set("releaseBuffer", Napi::Function::New(env, ReleaseBuffer, "releaseBuffer"));
  exports.Set("takeDiscards", Napi::Function::New(env, TakeDiscards, "takeDiscards"));
  exports.Set("captureInfo", Napi::Function::New(env, CaptureInfoJs, "captureInfo"));
  exports.Set("abortCapture", Napi::Function::New(env, AbortCapture, "abortCapture"));
  exports.Set("closeCapture", Napi::Function::New(env, CloseCapture, "closeCapture"));
}

}  // namespace bgsnap
