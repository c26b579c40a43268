// Staging: reading strided or 16-bit rows into contiguous float/double buffers for the
// kernels, and writing results back. Rows that are already contiguous in the compute type
// are used in place, without a copy.
#pragma once

#include <softce/softce.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels.hpp"
#include "validate.hpp"

namespace softce::detail {

inline float bf16_to_float(std::uint16_t bits) {
  std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline std::uint16_t float_to_bf16(float f) {  // round to nearest even
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<std::uint16_t>((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<std::uint16_t>(u >> 16);
}

// double -> bfloat16 rounded once: round to odd into float32 (keeps a sticky bit), then
// round to nearest even into bfloat16; plain double -> float -> bfloat16 could round twice.
inline std::uint16_t double_to_bf16(double d) {
  float f = static_cast<float>(d);
  if (std::isfinite(f) && static_cast<double>(f) != d) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) --u;  // truncate toward zero
    u |= 1;                                                       // sticky
    std::memcpy(&f, &u, 4);
  }
  return float_to_bf16(f);
}

inline float f16_to_float(std::uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

inline std::uint16_t float_to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);  // round to nearest even
  std::uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

// Reads element `offset` of a float array of any float dtype as T.
template <class T>
inline T load_float(const char* base, dtype type, std::int64_t offset) {
  switch (type) {
    case dtype::float32: return static_cast<T>(reinterpret_cast<const float*>(base)[offset]);
    case dtype::float64: return static_cast<T>(reinterpret_cast<const double*>(base)[offset]);
    case dtype::bfloat16:
      return static_cast<T>(bf16_to_float(reinterpret_cast<const std::uint16_t*>(base)[offset]));
    case dtype::float16:
      return static_cast<T>(f16_to_float(reinterpret_cast<const std::uint16_t*>(base)[offset]));
    default: return T(0);
  }
}

template <class T>
inline void store_float(char* base, dtype type, std::int64_t offset, T value) {
  switch (type) {
    case dtype::float32: reinterpret_cast<float*>(base)[offset] = static_cast<float>(value); break;
    case dtype::float64: reinterpret_cast<double*>(base)[offset] = static_cast<double>(value); break;
    case dtype::bfloat16:
      reinterpret_cast<std::uint16_t*>(base)[offset] =
          std::is_same_v<T, double> ? double_to_bf16(static_cast<double>(value)) : float_to_bf16(static_cast<float>(value));
      break;
    case dtype::float16: {
      const _Float16 h = static_cast<_Float16>(value);  // one rounding, from T directly
      std::memcpy(reinterpret_cast<std::uint16_t*>(base) + offset, &h, 2);
      break;
    }
    default: break;
  }
}

inline std::int64_t load_index(const char* base, dtype type, std::int64_t offset) {
  return type == dtype::int32 ? reinterpret_cast<const std::int32_t*>(base)[offset]
                              : reinterpret_cast<const std::int64_t*>(base)[offset];
}

// Copies `count` elements at base + offset + i * stride into out (converted to T).
// `half`: the 16-bit conversion kernels, fetched once by the caller (or here when null).
template <class T>
void gather(const char* base, dtype type, std::int64_t offset, std::int64_t stride,
            std::int64_t count, T* out, const half_kernel_table* half = nullptr) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1 && (type == dtype::bfloat16 || type == dtype::float16)) {
      (half ? *half : kernels().half)
          .half_to_float(reinterpret_cast<const std::uint16_t*>(base) + offset, type == dtype::bfloat16, count, out);
      return;
    }
  }
  if (type == dtype_of<T>()) {
    const T* p = reinterpret_cast<const T*>(base) + offset;
    for (std::int64_t i = 0; i < count; ++i) out[i] = p[i * stride];
    return;
  }
  switch (type) {
    case dtype::float32: {
      const float* p = reinterpret_cast<const float*>(base) + offset;
      for (std::int64_t i = 0; i < count; ++i) out[i] = static_cast<T>(p[i * stride]);
      break;
    }
    case dtype::float64: {
      const double* p = reinterpret_cast<const double*>(base) + offset;
      for (std::int64_t i = 0; i < count; ++i) out[i] = static_cast<T>(p[i * stride]);
      break;
    }
    case dtype::bfloat16: {
      const std::uint16_t* p = reinterpret_cast<const std::uint16_t*>(base) + offset;
      for (std::int64_t i = 0; i < count; ++i) out[i] = static_cast<T>(bf16_to_float(p[i * stride]));
      break;
    }
    case dtype::float16: {
      const std::uint16_t* p = reinterpret_cast<const std::uint16_t*>(base) + offset;
      for (std::int64_t i = 0; i < count; ++i) out[i] = static_cast<T>(f16_to_float(p[i * stride]));
      break;
    }
    default: break;
  }
}

template <class T>
void scatter(const T* in, std::int64_t count, char* base, dtype type, std::int64_t offset,
             std::int64_t stride, const half_kernel_table* half = nullptr) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1 && (type == dtype::bfloat16 || type == dtype::float16)) {
      (half ? *half : kernels().half)
          .float_to_half(in, type == dtype::bfloat16, count, reinterpret_cast<std::uint16_t*>(base) + offset);
      return;
    }
  }
  if (type == dtype_of<T>()) {
    T* p = reinterpret_cast<T*>(base) + offset;
    for (std::int64_t i = 0; i < count; ++i) p[i * stride] = in[i];
    return;
  }
  for (std::int64_t i = 0; i < count; ++i) store_float<T>(base, type, offset + i * stride, in[i]);
}

// A scratch row (an exp cache) kept per thread between calls: a fresh vector of a 32k-class
// row is 128 KiB, which glibc serves with mmap, so every call paid the zero-fill and the
// page faults again (measured: +60 % on an in-cache distillation call). Slots are reused
// while free; rows above kKeep elements are freed on release, so at most a few kKeep
// buffers stay per thread. Acquire and release on one thread; the data may be used by
// others in between (a long row's pieces). Contents are uninitialised.
template <class T>
class scratch_row {
 public:
  scratch_row() = default;
  explicit scratch_row(std::size_t n) {
    auto& pool = slots();
    for (auto& s : pool)
      if (!s->in_use) {
        slot_ = s.get();
        break;
      }
    if (!slot_) {
      pool.push_back(std::make_unique<slot>());
      slot_ = pool.back().get();
    }
    slot_->in_use = true;
    if (slot_->size < n) {
      slot_->data.reset();
      slot_->data.reset(new T[n]);
      slot_->size = n;
    }
  }
  scratch_row(scratch_row&& other) noexcept : slot_(other.slot_) { other.slot_ = nullptr; }
  scratch_row& operator=(scratch_row&& other) noexcept {
    if (this != &other) {
      release();
      slot_ = other.slot_;
      other.slot_ = nullptr;
    }
    return *this;
  }
  scratch_row(const scratch_row&) = delete;
  scratch_row& operator=(const scratch_row&) = delete;
  ~scratch_row() { release(); }
  T* data() const { return slot_ ? slot_->data.get() : nullptr; }

 private:
  static constexpr std::size_t kKeep = std::size_t{1} << 20;
  struct slot {
    std::unique_ptr<T[]> data;
    std::size_t size = 0;
    bool in_use = false;
  };
  static std::vector<std::unique_ptr<slot>>& slots() {
    thread_local std::vector<std::unique_ptr<slot>> pool;
    return pool;
  }
  void release() {
    if (!slot_) return;
    slot_->in_use = false;
    if (slot_->size > kKeep) {
      slot_->data.reset();
      slot_->size = 0;
    }
    slot_ = nullptr;
  }
  slot* slot_ = nullptr;
};

// Whether rows of `op` are read and written where they are, as T (no staging copy).
template <class T>
bool direct_rows(const row_operand& op) {
  return op.type == dtype_of<T>() && op.contiguous_rows();
}

// Reads rows of an operand as contiguous T (in place when possible).
template <class T>
class row_reader {
 public:
  explicit row_reader(const row_operand* op) : op_(op) {}
  const T* row(std::int64_t r) {
    const std::int64_t off = op_->row_offset(r);
    if (direct_rows<T>(*op_)) return op_->template ptr<T>(off);
    buffer_.resize(static_cast<std::size_t>(op_->inner));
    if (!half_) half_ = &kernels().half;  // once per reader, not per row
    gather<T>(op_->base, op_->type, off, op_->class_stride, op_->inner, buffer_.data(), half_);
    return buffer_.data();
  }

 private:
  const row_operand* op_;
  std::vector<T> buffer_;
  const half_kernel_table* half_ = nullptr;
};

// Hands out a contiguous T row to write, and copies it to the operand on commit().
template <class T>
class row_writer {
 public:
  explicit row_writer(const row_operand* op) : op_(op) {}
  T* begin(std::int64_t r) {
    offset_ = op_->row_offset(r);
    direct_ = direct_rows<T>(*op_);
    if (direct_) return const_cast<T*>(op_->template ptr<T>(offset_));
    buffer_.resize(static_cast<std::size_t>(op_->inner));
    return buffer_.data();
  }
  void commit() {
    if (direct_) return;
    if (!half_) half_ = &kernels().half;  // once per writer, not per row
    scatter<T>(buffer_.data(), op_->inner, const_cast<char*>(op_->base), op_->type, offset_, op_->class_stride,
               half_);
  }
  void zero_row(std::int64_t r) { fill_row(r, T(0)); }
  void fill_row(std::int64_t r, T value) {
    T* g = begin(r);
    std::fill(g, g + op_->inner, value);
    commit();
  }

 private:
  const row_operand* op_;
  std::vector<T> buffer_;
  std::int64_t offset_ = 0;
  bool direct_ = false;
  const half_kernel_table* half_ = nullptr;
};


}  // namespace softce::detail
