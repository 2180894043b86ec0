// Entry point of the bgsnap native addon. The surface is small on purpose: a few
// calls named for what they do; errno becomes an error code; callers own buffers.
#include "addon.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  bgsnap::InitCapture(env, exports);
  bgsnap::InitQemuUffd(env, exports);
  return exports;
}

NODE_API_MODULE(bgsnap, Init)
