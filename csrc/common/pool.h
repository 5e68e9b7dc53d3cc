// bigmodel's CPU buffer cache.
//
// Large tensors (gate buffers, outputs, saved activations) are served from a cache of blocks that
// bigmodel owns: a freed block goes back to the cache instead of to glibc, so the next call does not
// pay for fresh pages (a page fault per 4 KiB, and the kernel zeroing it). Blocks are 2 MiB aligned;
// BIGMODEL_HUGEPAGES=1 advises them for transparent huge pages (off by default: see pool.cpp). Small
// requests fall through to PyTorch's CPU allocator.
//
// The cache keeps at most BIGMODEL_CACHE_MB megabytes (default 2048) of free blocks; beyond that a
// freed block is returned to the system. `bigmodel::empty_cache()` releases every free block.
#pragma once

#include <ATen/core/Tensor.h>

namespace bigmodel {

// An uninitialised CPU tensor whose storage comes from the cache.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees every cached (unused) block; returns the number of bytes released.
int64_t empty_cache();

// Bytes currently held in free cached blocks.
int64_t cached_bytes();

}  // namespace bigmodel
