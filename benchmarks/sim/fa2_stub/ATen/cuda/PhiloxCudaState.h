// Stand-in for ATen's PhiloxCudaState, which FA2's headers name for dropout (off in
// fa2_forward.cu): lets the FA2 forward build without torch.
#pragma once

#include <cstdint>

namespace at {
struct PhiloxCudaState {
  union Payload {
    uint64_t val;
    int64_t* ptr;
  };
  Payload seed_{};
  Payload offset_{};
  uint32_t offset_intragraph_ = 0;
  bool captured_ = false;
};
}  // namespace at
