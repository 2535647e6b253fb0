// The partition every op's bindings start from: the stable partition of a (B, L) mask into
// index lists (the op partition_indices, partition/), as the kernels' row sets.
#pragma once

#include <utility>

#include <ATen/core/Tensor.h>

#include "device/kernel_args.h"

namespace dsa_ops {

struct Partition {
  at::Tensor index, count;  // (B, L), (B,) int32
  RowSetArg set(bool complement) const {
    return {index.data_ptr<int32_t>(), count.data_ptr<int32_t>(), complement};
  }
};

// Runs the partition kernel on `mask` (checked; the caller holds the device guard).
// Defined in partition/bindings.cpp, beside the op.
Partition partition_of(const at::Tensor& mask);

// A partition handed back by a backward op: the forward's output for `mask`, checked
// against what the kernels index with it (an int32 list per sample and a count per sample).
inline Partition saved_partition(const char* op, const char* index_name, const at::Tensor& index,
                                 const char* count_name, const at::Tensor& count,
                                 const at::Tensor& mask) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{index_name, index},
                                {count_name, count}}) {
    TORCH_CHECK(t.device() == mask.device(), op, ": ", name, " is on ", t.device(),
                " but the mask is on ", mask.device());
    TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name,
                " (the forward's partition) must be int32, got ", t.scalar_type());
  }
  TORCH_CHECK(index.sizes() == mask.sizes(), op, ": ", index_name, " must have shape (B, L) = ",
              mask.sizes(), ", got ", index.sizes());
  TORCH_CHECK(count.dim() == 1 && count.size(0) == mask.size(0), op, ": ", count_name,
              " must have shape (B,) = (", mask.size(0), "), got ", count.sizes());
  return {index.contiguous(), count.contiguous()};
}

}  // namespace dsa_ops
