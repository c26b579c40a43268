// softce CLI — reading numeric tables (features, targets, logits) from CSV, NPY and IDX.
//
// Every reader turns a file into a `table`: rows × cols float32 values, row-major, plus what
// is needed to point at a row in an error message. A row is a CSV line, or one index along
// the first axis of an NPY/IDX array (the remaining axes are flattened into columns).
// Readers take the whole file as bytes, so they are easy to fuzz; they validate everything
// they read and throw input_error with "FILE:LINE: ..." / "FILE: record R: ..." messages.
// Sizes declared in a binary header are checked against the bytes actually present before
// anything is allocated, so a lying header cannot make a reader allocate a huge array.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace softce::cli {

enum class table_format { csv, npy, idx };

struct table {
  std::string path;               // as the user gave it (for messages)
  table_format format = table_format::csv;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::vector<float> values;      // (rows, cols), row-major
  std::vector<std::string> header;// CSV column names, when the file has a header line
  std::vector<std::int64_t> line; // CSV: 1-based line number of each row
  bool integer_dtype = false;     // NPY/IDX: the stored element type is an integer

  float at(std::int64_t row, std::int64_t col) const { return values[row * cols + col]; }
  // "data.csv:12" for CSV rows, "data.npy: record 11" for binary records.
  std::string where(std::int64_t row) const;
};

struct read_options {
  // NaN / ±Inf values are errors unless allowed (check-targets allows them so that it can
  // list every bad row instead of stopping at the first).
  bool allow_nonfinite = false;
};

// Parsers over a whole file in memory. `path` only names the file in messages.
table parse_csv(std::string_view bytes, const std::string& path, const read_options& options = {});
table parse_npy(std::string_view bytes, const std::string& path, const read_options& options = {});
table parse_idx(std::string_view bytes, const std::string& path, const read_options& options = {});

// gzip: true when `bytes` start with the gzip magic. gunzip never produces more than the
// deflate format's maximum ratio (1032:1) allows, so a corrupt or hostile stream cannot
// make it allocate more than about a thousand times the compressed size.
bool is_gzip(std::string_view bytes);
std::string gunzip(std::string_view bytes, const std::string& path);

// Parses bytes as the format named by the file name (".npy", ".csv"/".tsv"/".txt", a name
// containing "idx" or ending in "-ubyte"), after removing a ".gz" suffix and decompressing
// gzip data; when the name says nothing, the format is recognised from the content.
table parse_table(std::string_view bytes, const std::string& path, const read_options& options = {});

// Reads a file (input_error for a missing, unreadable, empty file or a directory).
std::string read_file(const std::string& path);

// read_file + parse_table.
table load_table(const std::string& path, const read_options& options = {});

}  // namespace softce::cli
