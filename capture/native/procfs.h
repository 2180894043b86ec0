// /proc readers for the capture engine.
#pragma once
#include <functional>

#include "capture.h"

namespace bgsnap {

bool ReadWhole(const std::string& path, std::string* out);
bool ParseMaps(const std::string& text, std::vector<MapEntry>* out);
bool ScanTouched(int pagemapFd, uint64_t start, uint64_t end,
                 const std::function<void(uint64_t, uint64_t, bool)>& fn, Failure* f);

}  // namespace bgsnap
