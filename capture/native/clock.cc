// CLOCK_MONOTONIC milliseconds, for the addon and the freezer helper alike.
#include <time.h>

#include "capture.h"

namespace bgsnap {

double NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

}  // namespace bgsnap
