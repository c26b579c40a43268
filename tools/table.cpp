// softce CLI — CSV, NPY and IDX readers (see table.hpp for the contract).
//
// The readers are written for hostile input (they are fuzzed): every length read from a
// header is checked against the bytes present, all size arithmetic is overflow-checked, and
// nothing is allocated before the check passes.
#include "table.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cli_error.hpp"
#include "limits.hpp"

namespace softce::cli {

namespace {

[[noreturn]] void fail(const std::string& message) { throw input_error(message); }

// A value from the file quoted in a message: at most 24 characters, printable only.
std::string quote(std::string_view s) {
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < 24; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    out += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
  }
  if (s.size() > 24) out += "...";
  return out + "'";
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// A decimal number as written by C, Python and NumPy ("1", "-2.5e-3", "+4", "nan", "inf").
// Returns false for anything else. Overflow to infinity is reported as an infinite value
// (so it is caught by the non-finite check); underflow gives the denormal or zero.
bool parse_number(std::string_view s, double& value) {
  if (s.size() >= 2 && s.front() == '"' && s.back() == '"') s = trim(s.substr(1, s.size() - 2));
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  if (s.empty() || s.front() == '+') return false;
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, value);
  if (ptr != end) return false;
  if (ec == std::errc::result_out_of_range) {
    std::string copy(s);  // strtod gives ±HUGE_VAL on overflow and a tiny value on underflow
    value = std::strtod(copy.c_str(), nullptr);
    return true;
  }
  return ec == std::errc();
}

std::string format_number(double v) {
  char buffer[32];
  auto [ptr, ec] = std::to_chars(buffer, buffer + sizeof buffer, v);
  return std::string(buffer, ec == std::errc() ? ptr : buffer);
}

// Checks a value read as double and converts it to float32.
float to_float(double v, const read_options& options, const table& t, std::int64_t row,
               std::int64_t col, std::string_view text = {}) {
  auto column = [&] {
    return t.cols > 1 || t.format == table_format::csv ? " in column " + std::to_string(col + 1)
                                                       : std::string();
  };
  if (!std::isfinite(v)) {
    if (!options.allow_nonfinite)
      fail(t.where(row) + ": non-finite value " + (text.empty() ? format_number(v) : quote(text)) +
           column());
    return static_cast<float>(v);
  }
  // Values below the midpoint between FLT_MAX and 2^128 round to ±FLT_MAX (so the shortest
  // decimal of FLT_MAX, 3.4028235e+38, reads back); beyond it they would be infinite.
  constexpr double float_limit = 0x1.ffffffp127;
  if (std::fabs(v) >= float_limit)
    fail(t.where(row) + ": value " + (text.empty() ? format_number(v) : quote(text)) +
         " is out of float32 range" + column());
  if (std::fabs(v) > std::numeric_limits<float>::max())
    return static_cast<float>(std::copysign(double{std::numeric_limits<float>::max()}, v));
  return static_cast<float>(v);
}

// Splits a CSV line. `delimiter` ' ' means runs of blanks (NumPy's savetxt default).
// Returns false (fields incomplete) when the line has more than max_csv_columns fields.
bool split(std::string_view line, char delimiter, std::vector<std::string_view>& fields) {
  fields.clear();
  if (delimiter == ' ') {
    std::size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
      if (i == line.size()) break;
      std::size_t j = i;
      while (j < line.size() && line[j] != ' ' && line[j] != '\t') ++j;
      if (fields.size() == static_cast<std::size_t>(max_csv_columns)) return false;
      fields.push_back(line.substr(i, j - i));
      i = j;
    }
    return true;
  }
  std::size_t start = 0;
  for (;;) {
    std::size_t end = line.find(delimiter, start);
    if (fields.size() == static_cast<std::size_t>(max_csv_columns)) return false;
    fields.push_back(trim(line.substr(start, end == std::string_view::npos ? end : end - start)));
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  return true;
}

bool checked_multiply(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return !__builtin_mul_overflow(a, b, &out);
}

std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Element types shared by the NPY and IDX readers.
enum class element { f4, f8, i1, i2, i4, i8, u1, u2, u4, u8, b1 };

std::size_t element_size(element e) {
  switch (e) {
    case element::i1: case element::u1: case element::b1: return 1;
    case element::i2: case element::u2: return 2;
    case element::f4: case element::i4: case element::u4: return 4;
    case element::f8: case element::i8: case element::u8: return 8;
  }
  return 1;
}

const char* element_name(element e) {
  switch (e) {
    case element::f4: return "float32"; case element::f8: return "float64";
    case element::i1: return "int8";    case element::i2: return "int16";
    case element::i4: return "int32";   case element::i8: return "int64";
    case element::u1: return "uint8";   case element::u2: return "uint16";
    case element::u4: return "uint32";  case element::u8: return "uint64";
    case element::b1: return "bool";
  }
  return "?";
}

template <class T>
T load(const unsigned char* p, bool big_endian) {
  T v;
  std::memcpy(&v, p, sizeof v);
  if (big_endian != (std::endian::native == std::endian::big)) {
    unsigned char b[sizeof v];
    std::memcpy(b, &v, sizeof v);
    std::reverse(b, b + sizeof v);
    std::memcpy(&v, b, sizeof v);
  }
  return v;
}

double load_element(const unsigned char* p, element e, bool big_endian) {
  switch (e) {
    case element::f4: return load<float>(p, big_endian);
    case element::f8: return load<double>(p, big_endian);
    case element::i1: return static_cast<double>(static_cast<std::int8_t>(*p));
    case element::u1: return static_cast<double>(*p);
    case element::b1: return *p ? 1.0 : 0.0;
    case element::i2: return load<std::int16_t>(p, big_endian);
    case element::u2: return load<std::uint16_t>(p, big_endian);
    case element::i4: return load<std::int32_t>(p, big_endian);
    case element::u4: return load<std::uint32_t>(p, big_endian);
    case element::i8: return static_cast<double>(load<std::int64_t>(p, big_endian));
    case element::u8: return static_cast<double>(load<std::uint64_t>(p, big_endian));
  }
  return 0;
}

// A binary file's header: what the data after `data_offset` must be.
struct binary_header {
  std::vector<std::uint64_t> shape;
  element type = element::u1;
  bool big_endian = false;
  std::size_t data_offset = 0;
  const char* what = "NPY";
};

// Bytes of data the header declares (input_error for an impossible shape).
std::uint64_t declared_data_bytes(const binary_header& h, const std::string& path) {
  if (h.shape.empty())
    fail(path + ": the " + std::string(h.what) +
         " array is 0-dimensional (a single number); expected rows");
  std::uint64_t count = 1;
  for (std::uint64_t d : h.shape)
    if (!checked_multiply(count, d, count))
      fail(path + ": " + h.what + " header declares an impossible shape " + shape_text(h.shape));
  std::uint64_t bytes_needed = 0;
  if (!checked_multiply(count, element_size(h.type), bytes_needed) ||
      bytes_needed > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
    fail(path + ": " + h.what + " header declares an impossible shape " + shape_text(h.shape));
  return bytes_needed;
}

// Shared tail of the binary readers: shape check against the bytes present, then decoding.
void decode_array(table& t, std::string_view bytes, const binary_header& h,
                  const read_options& options) {
  const std::vector<std::uint64_t>& shape = h.shape;
  const element type = h.type;
  const char* what = h.what;
  const std::string_view data = bytes.substr(h.data_offset);
  const std::uint64_t bytes_needed = declared_data_bytes(h, t.path);
  const std::uint64_t count = bytes_needed / element_size(type);
  if (bytes_needed > data.size())
    fail(t.path + ": truncated " + what + " data: the header declares shape " + shape_text(shape) +
         " of " + element_name(type) + " (" + std::to_string(bytes_needed) +
         " bytes) but only " + std::to_string(data.size()) + " bytes follow the header");
  if (bytes_needed < data.size())
    fail(t.path + ": " + std::to_string(data.size() - bytes_needed) +
         " unexpected bytes after the " + what + " data: the header declares shape " +
         shape_text(shape) + " of " + element_name(type) + " (" + std::to_string(bytes_needed) +
         " bytes)");
  if (shape[0] == 0) fail(t.path + ": the array has no records (shape " + shape_text(shape) + ")");
  if (count == 0) fail(t.path + ": the records are empty (shape " + shape_text(shape) + ")");
  if (count > static_cast<std::uint64_t>(max_table_values))
    fail(t.path + ": " + std::to_string(count) + " values (shape " + shape_text(shape) +
         "), more than the limit of " + std::to_string(max_table_values) + " on a table");
  t.rows = static_cast<std::int64_t>(shape[0]);
  t.cols = static_cast<std::int64_t>(count / shape[0]);
  t.integer_dtype = type != element::f4 && type != element::f8;
  t.values.resize(count);  // bounded: count * element_size <= file size
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  const std::size_t size = element_size(type);
  for (std::uint64_t i = 0; i < count; ++i) {
    double v = load_element(p + i * size, type, h.big_endian);
    t.values[i] = t.integer_dtype ? static_cast<float>(v)
                                  : to_float(v, options, t, static_cast<std::int64_t>(i) / t.cols,
                                             static_cast<std::int64_t>(i) % t.cols);
  }
}

// ---- NPY header: a Python dict literal such as
//      {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
struct npy_header_parser {
  std::string_view s;
  std::size_t i = 0;
  const std::string& path;

  [[noreturn]] void bad(const std::string& why) {
    fail(path + ": corrupt NPY header (" + why + ")");
  }
  void skip() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool accept(char c) {
    skip();
    if (i < s.size() && s[i] == c) { ++i; return true; }
    return false;
  }
  void expect(char c) {
    if (!accept(c)) bad(std::string("expected '") + c + "'");
  }
  std::string string_literal() {
    skip();
    if (i >= s.size() || (s[i] != '\'' && s[i] != '"')) bad("expected a string");
    char q = s[i++];
    std::size_t end = s.find(q, i);
    if (end == std::string_view::npos) bad("unterminated string");
    std::string out(s.substr(i, end - i));
    i = end + 1;
    return out;
  }
  bool boolean() {
    skip();
    if (s.substr(i, 4) == "True") { i += 4; return true; }
    if (s.substr(i, 5) == "False") { i += 5; return false; }
    bad("expected True or False");
  }
  std::vector<std::uint64_t> tuple() {
    expect('(');
    std::vector<std::uint64_t> dims;
    for (;;) {
      if (accept(')')) break;
      skip();
      if (i >= s.size() || s[i] < '0' || s[i] > '9') bad("expected a dimension");
      std::uint64_t v = 0;
      auto [ptr, ec] = std::from_chars(s.data() + i, s.data() + s.size(), v);
      if (ec != std::errc()) bad("dimension out of range");
      i = static_cast<std::size_t>(ptr - s.data());
      if (i < s.size() && s[i] == 'L') ++i;  // Python 2 long
      dims.push_back(v);
      if (dims.size() > 64) bad("more than 64 dimensions");
      if (accept(')')) break;
      expect(',');
    }
    return dims;
  }
};

element parse_descr(const std::string& descr, bool& big_endian, const std::string& path) {
  auto unsupported = [&]() -> element {
    fail(path + ": unsupported NPY dtype " + quote(descr) +
         " (expected float32/float64 or an integer type)");
  };
  if (descr.size() < 3) unsupported();
  char order = descr[0];
  if (order != '<' && order != '>' && order != '|' && order != '=') unsupported();
  big_endian = order == '>' || (order == '=' && std::endian::native == std::endian::big);
  std::string_view code = std::string_view(descr).substr(1);
  if (code == "f4") return element::f4;
  if (code == "f8") return element::f8;
  if (code == "i1") return element::i1;
  if (code == "i2") return element::i2;
  if (code == "i4") return element::i4;
  if (code == "i8") return element::i8;
  if (code == "u1") return element::u1;
  if (code == "u2") return element::u2;
  if (code == "u4") return element::u4;
  if (code == "u8") return element::u8;
  if (code == "b1") return element::b1;
  return unsupported();
}

}  // namespace

std::string table::where(std::int64_t row) const {
  if (format == table_format::csv && row >= 0 && row < static_cast<std::int64_t>(line.size()))
    return path + ":" + std::to_string(line[row]);
  return path + ": record " + std::to_string(row);
}

// ---------------------------------------------------------------------------------------
// CSV

table parse_csv(std::string_view bytes, const std::string& path, const read_options& options) {
  table t;
  t.path = path;
  t.format = table_format::csv;
  if (bytes.empty()) fail(path + ": file is empty");
  if (bytes.substr(0, 3) == "\xEF\xBB\xBF") bytes.remove_prefix(3);  // UTF-8 byte order mark

  std::vector<std::string_view> fields;
  char delimiter = 0;
  bool first = true;
  std::int64_t line_number = 0;
  std::size_t pos = 0;
  while (pos < bytes.size()) {
    std::size_t end = bytes.find('\n', pos);
    if (end == std::string_view::npos) end = bytes.size();
    std::string_view line = bytes.substr(pos, end - pos);
    pos = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    line = trim(line);
    if (line.empty() || line.front() == '#') continue;  // blank line or comment (savetxt header)
    if (line.find('\0') != std::string_view::npos)
      fail(path + ":" + std::to_string(line_number) + ": binary data in a CSV file");
    if (delimiter == 0) {
      delimiter = line.find(',') != std::string_view::npos    ? ','
                  : line.find('\t') != std::string_view::npos ? '\t'
                  : line.find(';') != std::string_view::npos  ? ';'
                                                              : ' ';
    }
    const auto where = [&] { return path + ":" + std::to_string(line_number); };
    if (!split(line, delimiter, fields))
      fail(where() + ": more than " + std::to_string(max_csv_columns) +
           " columns, the limit on a CSV line");

    if (first) {
      first = false;
      std::size_t numeric = 0;
      double v;
      for (auto f : fields) numeric += parse_number(f, v);
      if (numeric == 0) {  // a header: no field is a number
        for (auto f : fields) t.header.emplace_back(f);
        t.cols = static_cast<std::int64_t>(fields.size());
        continue;
      }
      t.cols = static_cast<std::int64_t>(fields.size());
    }
    if (static_cast<std::int64_t>(fields.size()) != t.cols)
      fail(where() + ": expected " + std::to_string(t.cols) + " values, found " +
           std::to_string(fields.size()));
    if (t.values.size() + fields.size() > static_cast<std::size_t>(max_table_values))
      fail(where() + ": more than " + std::to_string(max_table_values) +
           " values, the limit on a table");
    t.line.push_back(line_number);
    ++t.rows;
    for (std::size_t c = 0; c < fields.size(); ++c) {
      double v;
      if (fields[c].empty()) fail(where() + ": empty value in column " + std::to_string(c + 1));
      if (!parse_number(fields[c], v))
        fail(where() + ": non-numeric value " + quote(fields[c]) + " in column " +
             std::to_string(c + 1));
      t.values.push_back(
          to_float(v, options, t, t.rows - 1, static_cast<std::int64_t>(c), fields[c]));
    }
  }
  if (t.rows == 0) fail(path + ": no data rows");
  return t;
}

// ---------------------------------------------------------------------------------------
// NPY (https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html)

namespace {

// Largest NPY header accepted (NumPy itself refuses more than 10000 bytes by default).
constexpr std::size_t max_npy_header = 1 << 20;

binary_header parse_npy_header(std::string_view bytes, const std::string& path) {
  if (bytes.empty()) fail(path + ": file is empty");
  if (bytes.size() < 6 || bytes.substr(0, 6) != "\x93NUMPY")
    fail(path + ": not an NPY file (bad magic)");
  if (bytes.size() < 10) fail(path + ": truncated NPY header");
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
  const unsigned major = b[6];
  std::size_t prefix, header_length;
  if (major == 1) {
    prefix = 10;
    header_length = b[8] | (std::size_t{b[9]} << 8);
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) fail(path + ": truncated NPY header");
    prefix = 12;
    header_length = b[8] | (std::size_t{b[9]} << 8) | (std::size_t{b[10]} << 16) |
                    (std::size_t{b[11]} << 24);
  } else {
    fail(path + ": unsupported NPY format version " + std::to_string(major) + "." +
         std::to_string(b[7]));
  }
  if (header_length > max_npy_header)
    fail(path + ": NPY header of " + std::to_string(header_length) + " bytes, more than the " +
         "limit of " + std::to_string(max_npy_header));
  if (header_length > bytes.size() - prefix)
    fail(path + ": truncated NPY header (the header length is " + std::to_string(header_length) +
         " bytes but only " + std::to_string(bytes.size() - prefix) + " follow)");

  npy_header_parser p{bytes.substr(prefix, header_length), 0, path};
  std::string descr;
  bool fortran_order = false, have_descr = false, have_order = false, have_shape = false;
  std::vector<std::uint64_t> shape;
  p.expect('{');
  while (!p.accept('}')) {
    std::string key = p.string_literal();
    p.expect(':');
    if (key == "descr" && !have_descr) {
      p.skip();
      if (p.i < p.s.size() && p.s[p.i] == '[')
        fail(path + ": unsupported NPY dtype (structured arrays are not supported)");
      descr = p.string_literal();
      have_descr = true;
    } else if (key == "fortran_order" && !have_order) {
      fortran_order = p.boolean();
      have_order = true;
    } else if (key == "shape" && !have_shape) {
      shape = p.tuple();
      have_shape = true;
    } else {
      p.bad("unexpected key " + quote(key));
    }
    if (p.accept('}')) break;
    p.expect(',');
  }
  if (!have_descr || !have_order || !have_shape)
    p.bad(std::string("missing key '") +
          (!have_descr ? "descr" : !have_order ? "fortran_order" : "shape") + "'");
  binary_header h;
  h.type = parse_descr(descr, h.big_endian, path);
  if (fortran_order && shape.size() > 1)
    fail(path + ": Fortran-order arrays are not supported (save the array in C order)");
  h.shape = std::move(shape);
  h.data_offset = prefix + header_length;
  h.what = "NPY";
  return h;
}

}  // namespace

table parse_npy(std::string_view bytes, const std::string& path, const read_options& options) {
  table t;
  t.path = path;
  t.format = table_format::npy;
  decode_array(t, bytes, parse_npy_header(bytes, path), options);
  return t;
}

// ---------------------------------------------------------------------------------------
// IDX (the MNIST format: magic 0 0 TYPE NDIM, NDIM big-endian uint32 sizes, big-endian data)

namespace {

binary_header parse_idx_header(std::string_view bytes, const std::string& path) {
  if (bytes.empty()) fail(path + ": file is empty");
  const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() < 4) fail(path + ": truncated IDX header");
  if (b[0] != 0 || b[1] != 0) fail(path + ": not an IDX file (bad magic)");
  element type;
  switch (b[2]) {
    case 0x08: type = element::u1; break;
    case 0x09: type = element::i1; break;
    case 0x0B: type = element::i2; break;
    case 0x0C: type = element::i4; break;
    case 0x0D: type = element::f4; break;
    case 0x0E: type = element::f8; break;
    default: {
      char code[8];
      std::snprintf(code, sizeof code, "0x%02X", b[2]);
      fail(path + ": not an IDX file (unknown element type " + code + ")");
    }
  }
  const std::size_t ndim = b[3];
  if (bytes.size() < 4 + 4 * ndim) fail(path + ": truncated IDX header");
  binary_header h;
  h.shape.resize(ndim);
  for (std::size_t i = 0; i < ndim; ++i) h.shape[i] = load<std::uint32_t>(b + 4 + 4 * i, true);
  h.type = type;
  h.big_endian = true;
  h.data_offset = 4 + 4 * ndim;
  h.what = "IDX";
  return h;
}

}  // namespace

table parse_idx(std::string_view bytes, const std::string& path, const read_options& options) {
  table t;
  t.path = path;
  t.format = table_format::idx;
  decode_array(t, bytes, parse_idx_header(bytes, path), options);
  return t;
}

// ---------------------------------------------------------------------------------------
// gzip and dispatch

bool is_gzip(std::string_view bytes) {
  return bytes.size() >= 2 && static_cast<unsigned char>(bytes[0]) == 0x1f &&
         static_cast<unsigned char>(bytes[1]) == 0x8b;
}

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// The format of (decompressed) bytes: by the file name, else by the content.
table_format detect_format(std::string_view bytes, const std::string& path) {
  std::string name = path.substr(path.find_last_of('/') + 1);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (ends_with(name, ".gz")) name.resize(name.size() - 3);
  if (ends_with(name, ".npy")) return table_format::npy;
  if (ends_with(name, ".csv") || ends_with(name, ".tsv") || ends_with(name, ".txt"))
    return table_format::csv;
  if (name.find("idx") != std::string::npos || ends_with(name, "-ubyte")) return table_format::idx;
  if (bytes.substr(0, 6) == "\x93NUMPY") return table_format::npy;
  if (bytes.size() >= 4 && bytes[0] == 0 && bytes[1] == 0) return table_format::idx;
  return table_format::csv;
}

// Bounds an input while it arrives (from a pipe, a FIFO, a device, or out of gzip): at most
// max_input_bytes, and for NPY/IDX exactly what the header declares, known as soon as the
// header is in (the first 2 MiB hold any accepted header). A prefix that cannot start a
// valid file (a bad header, binary bytes in a CSV) is refused then, without reading on.
class size_bound {
 public:
  size_bound(const std::string& path, const char* after) : path_(path), after_(after) {}
  // `received`: every byte so far; `complete`: nothing more will come.
  void check(std::string_view received, bool complete) {
    if (!resolved_ && !received.empty() && (received.size() >= (2u << 20) || complete)) {
      resolved_ = true;
      if (!is_gzip(received)) resolve(received);
    }
    if (received.size() > limit_) {
      if (header_)
        fail(path_ + ": more data than its " + header_ + " header declares (" +
             std::to_string(limit_) + " bytes in all)");
      fail(path_ + ": more than " + std::to_string(max_input_bytes) + " bytes" + after_ +
           ", the limit on an input file");
    }
  }
  std::uint64_t limit() const { return limit_; }

 private:
  void resolve(std::string_view prefix) {
    const table_format format = detect_format(prefix, path_);
    if (format == table_format::csv) {
      const std::size_t nul = prefix.find('\0');
      if (nul != std::string_view::npos)
        fail(path_ + ":" +
             std::to_string(std::count(prefix.begin(), prefix.begin() + nul, '\n') + 1) +
             ": binary data in a CSV file");
      return;
    }
    const binary_header h = format == table_format::npy ? parse_npy_header(prefix, path_)
                                                        : parse_idx_header(prefix, path_);
    const std::uint64_t data = declared_data_bytes(h, path_);
    if (data > max_input_bytes || h.data_offset + data > max_input_bytes)
      fail(path_ + ": the " + h.what + " header declares " + std::to_string(data) +
           " bytes of data (shape " + shape_text(h.shape) + "), more than the limit of " +
           std::to_string(max_input_bytes) + " bytes on an input file");
    limit_ = h.data_offset + data;
    header_ = h.what;
  }

  const std::string& path_;
  const char* after_;
  std::uint64_t limit_ = max_input_bytes;
  bool resolved_ = false;
  const char* header_ = nullptr;
};

}  // namespace

std::string gunzip(std::string_view bytes, const std::string& path) {
  // Deflate cannot expand data by more than 1032:1; anything larger is corrupt.
  const std::uint64_t ratio_limit = static_cast<std::uint64_t>(bytes.size()) * 1032 + 4096;
  size_bound bound(path, " after decompression");
  // The trailer's ISIZE (the last member's size mod 2^32) sizes the first buffer when it is
  // within the bounds; it is only a hint (a corrupt or truncated stream ends in anything),
  // so the bound is enforced as the data expands.
  std::uint64_t declared = 0;
  if (bytes.size() >= 18) {
    const auto* end = reinterpret_cast<const unsigned char*>(bytes.data() + bytes.size());
    declared = std::uint64_t{end[-4]} | std::uint64_t{end[-3]} << 8 |
               std::uint64_t{end[-2]} << 16 | std::uint64_t{end[-1]} << 24;
  }
  z_stream zs{};
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) fail(path + ": cannot initialise zlib");
  struct guard { z_stream* z; ~guard() { inflateEnd(z); } } release{&zs};

  // Room for one byte more than allowed, so that "too much" is seen.
  const auto capacity = [&] { return std::min(ratio_limit, bound.limit() + 1); };
  std::string out;
  out.resize(static_cast<std::size_t>(std::min<std::uint64_t>(
      capacity(), std::max<std::uint64_t>(
                      {std::uint64_t{bytes.size()} * 4, 1 << 16,
                       std::min<std::uint64_t>(declared + 1, std::uint64_t{bytes.size()} * 64)}))));
  std::size_t produced = 0, consumed = 0;
  for (;;) {
    if (produced == out.size()) {
      if (out.size() >= capacity()) {
        if (out.size() >= ratio_limit)
          fail(path + ": corrupt gzip data (it expands beyond the deflate format's limit)");
        bound.check(std::string_view(out.data(), produced), false);  // fails: over the bound
      }
      out.resize(static_cast<std::size_t>(std::min<std::uint64_t>(capacity(), out.size() * 2ull)));
    }
    const std::size_t in_chunk = std::min<std::size_t>(bytes.size() - consumed, 1u << 30);
    const std::size_t out_chunk = std::min<std::size_t>(out.size() - produced, 1u << 30);
    zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data() + consumed));
    zs.avail_in = static_cast<uInt>(in_chunk);
    zs.next_out = reinterpret_cast<Bytef*>(out.data() + produced);
    zs.avail_out = static_cast<uInt>(out_chunk);
    int rc = inflate(&zs, Z_NO_FLUSH);
    consumed += in_chunk - zs.avail_in;
    produced += out_chunk - zs.avail_out;
    bound.check(std::string_view(out.data(), produced), false);
    if (rc == Z_STREAM_END) {
      if (consumed == bytes.size()) break;
      // Another gzip member follows (as `cat a.gz b.gz` makes); otherwise trailing garbage.
      if (!is_gzip(bytes.substr(consumed)))
        fail(path + ": unexpected data after the end of the gzip stream");
      inflateReset(&zs);
      continue;
    }
    if (rc == Z_DATA_ERROR || rc == Z_NEED_DICT)
      fail(path + ": corrupt gzip data (" + (zs.msg ? zs.msg : "invalid deflate stream") + ")");
    if (rc == Z_MEM_ERROR) fail(path + ": out of memory while decompressing");
    if (rc == Z_BUF_ERROR || rc == Z_OK) {
      if (consumed == bytes.size() && zs.avail_out > 0)
        fail(path + ": truncated gzip data");
      continue;
    }
    fail(path + ": corrupt gzip data");
  }
  out.resize(produced);
  return out;
}

table parse_table(std::string_view bytes, const std::string& path, const read_options& options) {
  std::string inflated;
  if (is_gzip(bytes)) {
    inflated = gunzip(bytes, path);
    if (inflated.empty()) fail(path + ": file is empty (after decompression)");
    bytes = inflated;
  }
  switch (detect_format(bytes, path)) {
    case table_format::npy: return parse_npy(bytes, path, options);
    case table_format::idx: return parse_idx(bytes, path, options);
    case table_format::csv: break;
  }
  return parse_csv(bytes, path, options);
}

std::string read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) fail(path + ": no such file");
    fail(path + ": cannot open: " + std::strerror(errno));
  }
  struct closer { int fd; ~closer() { ::close(fd); } } close_on_exit{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path + ": cannot read: " + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) fail(path + ": is a directory, not a file");
  const bool regular = S_ISREG(st.st_mode);
  if (regular && static_cast<std::uint64_t>(st.st_size) > max_input_bytes)
    fail(path + ": " + std::to_string(st.st_size) + " bytes, more than the limit of " +
         std::to_string(max_input_bytes) + " bytes on an input file");
  // A pipe, FIFO or device has no size: read it under a bound (max_input_bytes, or what
  // its header declares), so /dev/zero or an endless pipe is refused, not swallowed.
  size_bound bound(path, "");
  std::string bytes;
  if (regular) bytes.reserve(static_cast<std::size_t>(st.st_size));
  char buffer[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path + ": cannot read: " + std::strerror(errno));
    }
    if (n == 0) break;
    bytes.append(buffer, static_cast<std::size_t>(n));
    if (!regular) bound.check(bytes, false);
    else if (bytes.size() > max_input_bytes)  // grew while being read
      fail(path + ": more than " + std::to_string(max_input_bytes) +
           " bytes, the limit on an input file");
  }
  if (bytes.empty()) fail(path + ": file is empty");
  if (!regular) bound.check(bytes, true);
  return bytes;
}

table load_table(const std::string& path, const read_options& options) {
  std::string bytes = read_file(path);
  return parse_table(bytes, path, options);
}

}  // namespace softce::cli
