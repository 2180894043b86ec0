// The bounded, pre-faulted buffer pool. Pre-faulting matters: copying 2 GiB took
// 2.2-6.2 s instead of ~0.4 s when our own buffers page-faulted during the copy,
// and the target's writers wait for every one of those copies.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "capture.h"

namespace bgsnap {

Memory::~Memory() {
  if (base) munmap(base, length);
}

BufferPool::~BufferPool() {
  if (efd_ >= 0) close(efd_);
}

bool BufferPool::Init(uint32_t totalMb, Failure* f) {
  efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (efd_ < 0) return f->Set(errno, "eventfd for capture buffers");
  size_t total = std::max<size_t>(totalMb, 2) << 20;
  // Batches of 1-4 MiB (1 MiB up to a 64 MiB pool): large enough for few
  // frames, and many: every mapping the scan passes costs a batch however few
  // pages it holds, and a target's dozens of small mappings used up 11 of 16
  // 4 MiB batches at once, so a writer's fault then waited 28-52 ms for a free
  // one (Redis, right after the snapshot).
  size_t dataBytes = std::min<size_t>(std::max<size_t>(total / 64, 1 << 20), 4 << 20);
  size_t count = std::max<size_t>(total / dataBytes, 2);
  uint32_t capData = static_cast<uint32_t>(dataBytes / kPage);
  uint32_t capIndex = capData * 16;  // zero records carry no data
  size_t per = dataBytes + capIndex * sizeof(uint32_t) + capData * sizeof(uint32_t) + capIndex;
  per = (per + kPage - 1) & ~(kPage - 1);
  memory = std::make_shared<Memory>();
  memory->length = per * count;
  void* p = mmap(nullptr, memory->length, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) return f->Set(errno, "allocating capture buffers");
  memory->base = p;
  batches.resize(count);
  for (size_t i = 0; i < count; i++) {
    uint8_t* base = static_cast<uint8_t*>(p) + i * per;
    Batch& b = batches[i];
    b.id = static_cast<uint32_t>(i);
    b.data = base;
    b.index = reinterpret_cast<uint32_t*>(base + dataBytes);
    b.crcs = b.index + capIndex;
    b.zero = base + dataBytes + (capIndex + capData) * sizeof(uint32_t);
    b.capData = capData;
    b.capIndex = capIndex;
    free_.push_back(b.id);
  }
  // A scan chunk (up to 2 MiB) may need this many fresh batches. Pools too
  // small to spare a reserve (2-3 batches) keep none.
  scanNeed_ = (kHuge / kPage + capData - 1) / capData;
  // Three quarters of a pool of 8 or more: 4 batches in flight keep the scan
  // as fast as the output takes it, and Redis under SET load at 64 MiB used up
  // a reserve of half the pool with its faults' 64 KiB neighbourhoods.
  reserve_ = count >= 8 ? count * 3 / 4 : count >= 4 ? count / 2 : 0;
  return true;
}

// Faults save 4 KiB instead of 64 KiB once half the reserve is gone. At "any
// of it gone", Redis's SETs used it up in the first ~800 faults and then
// faulted on 2-5 pages' worth each (several round trips per 64 KiB); at half,
// 4-7, with p99 better in 3 of 4 same-run rounds and max in all 4, and no
// buffer waits (bench/RESULTS.md).
bool BufferPool::Pressed() {
  std::lock_guard<std::mutex> lock(mu_);
  return free_.size() < reserve_ / 2;
}

bool BufferPool::ScanRoom() {
  std::lock_guard<std::mutex> lock(mu_);
  return free_.size() >= std::min(reserve_ + scanNeed_, batches.size());
}

void BufferPool::Signal() {
  uint64_t one = 1;
  if (write(efd_, &one, sizeof one) < 0) {}  // EAGAIN: already signalled
}

void BufferPool::ClearReleased() {
  uint64_t n;
  if (read(efd_, &n, sizeof n) < 0) {}  // EAGAIN: nothing pending
}

Batch* BufferPool::Acquire(const std::atomic<bool>& abort, std::atomic<double>& waitingSince) {
  std::unique_lock<std::mutex> lock(mu_);
  if (free_.empty()) waitingSince = NowMs();
  while (free_.empty() && !abort) cv_.wait(lock);
  waitingSince = 0;
  if (abort) return nullptr;
  Batch* b = &batches[free_.front()];
  free_.pop_front();
  b->block = -1;
  b->count = b->dataPages = 0;
  b->owner = Batch::kSaver;
  return b;
}

void BufferPool::Publish(Batch* b) {
  std::lock_guard<std::mutex> lock(mu_);
  if (b->count == 0) {
    b->owner = Batch::kFree;
    free_.push_front(b->id);  // most recently used first: see Release
    cv_.notify_all();
  } else {
    b->owner = Batch::kReady;
    ready_.push_back(b->id);
  }
}

void BufferPool::Wake() {
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
  Signal();
}

Batch* BufferPool::TakeReady() {
  std::lock_guard<std::mutex> lock(mu_);
  if (ready_.empty()) return nullptr;
  Batch* b = &batches[ready_.front()];
  ready_.pop_front();
  b->owner = Batch::kJs;
  return b;
}

size_t BufferPool::FreeCount() {
  std::lock_guard<std::mutex> lock(mu_);
  return free_.size();
}

size_t BufferPool::ReadyCount() {
  std::lock_guard<std::mutex> lock(mu_);
  return ready_.size();
}

bool BufferPool::Release(uint32_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (id >= batches.size() || batches[id].owner != Batch::kJs) return false;
  batches[id].owner = Batch::kFree;
  // Last in, first out: the batch handed back last is the likeliest to be in
  // the saver's cache still, so the next read's stores hit it instead of
  // fetching lines from memory (taking them in turn over a 64 MiB pool cost the
  // saver ~580 ms of CPU for 2 GiB, the most recent first ~500 ms, side by side).
  free_.push_front(id);
  cv_.notify_all();
  Signal();
  return true;
}

}  // namespace bgsnap
