// softce CLI — the bounds on inputs and options, in one place (documented in docs/cli.md).
//
// Every size that input can choose (a file's length, a header's shape, a class index, the
// --model spec) is checked against these before anything of that size is allocated, so a
// small hostile input gets a clear exit-2 message instead of an out-of-memory crash.
#pragma once

#include <cstdint>

namespace softce::cli {

// Bytes of one input file, after gzip decompression. A regular file's size is checked before
// reading; a pipe, FIFO or device is read up to this many bytes (or, for NPY/IDX, up to the
// size its header declares).
inline constexpr std::uint64_t max_input_bytes = std::uint64_t{1} << 30;  // 1 GiB

// Values (rows x columns) in one table, and in the (rows x classes) logits computed for a
// table: 2^28 float32 values = 1 GiB.
inline constexpr std::int64_t max_table_values = std::int64_t{1} << 28;

// Columns of a CSV line (as many as classes: a probability row has one per class).
inline constexpr std::int64_t max_csv_columns = std::int64_t{1} << 24;

// Classes: float32, in which class indices are read, holds every integer only up to 2^24.
inline constexpr std::int64_t max_classes = std::int64_t{1} << 24;

// Parameters of a model (weights + biases): 2^27 float32 = 512 MiB, and Adam keeps three
// more arrays of that size while training.
inline constexpr std::int64_t max_parameters = std::int64_t{1} << 27;

// Options.
inline constexpr std::int64_t max_threads = 1024;
inline constexpr std::int64_t max_epochs = 100000;
inline constexpr std::int64_t max_batch = std::int64_t{1} << 24;
inline constexpr std::int64_t max_rows_limit = std::int64_t{1} << 31;
// Adam moves each weight by up to about lr per step and the inputs are standardised, so a
// learning rate above 10 cannot train anything.
inline constexpr double max_learning_rate = 10;
// T^2 scales the distillation term; beyond 1000 the softened distributions are uniform to
// float32 precision.
inline constexpr double max_temperature = 1000;
// `aggregate`: items x classes, and annotators x classes^2 (the confusion matrices), each at
// most 2^25 values: Dawid–Skene keeps three float64 arrays of each size, so a small file that
// names many classes or annotators cannot claim gigabytes.
inline constexpr std::int64_t max_aggregate_values = std::int64_t{1} << 25;
// `aggregate`: EM iterations, and the additive smoothing of the confusion counts.
inline constexpr std::int64_t max_em_iterations = 100000;
inline constexpr double max_smoothing = 1e6;

}  // namespace softce::cli
