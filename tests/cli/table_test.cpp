// Unit tests of the CLI's CSV / NPY / IDX readers (tools/table.hpp), with exact messages.
#include "table.hpp"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <cstring>
#include <string>

#include "cli_error.hpp"

using namespace softce::cli;

namespace {

// The message of the input_error that `f` throws ("" if none).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const input_error& e) {
    return e.what();
  }
  return "";
}

std::string npy(const std::string& descr, const std::string& shape, const std::string& data,
                int major = 1) {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape +
                       ", }";
  const std::size_t prefix = major == 1 ? 10 : 12;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>((header.size() >> 8) & 0xff);
  if (major != 1) out += std::string(2, '\0');
  return out + header + data;
}

std::string floats(std::initializer_list<float> v) {
  return std::string(reinterpret_cast<const char*>(std::data(v)), v.size() * sizeof(float));
}

std::string idx_header(unsigned char type, std::initializer_list<std::uint32_t> dims) {
  std::string s{'\0', '\0', static_cast<char>(type), static_cast<char>(dims.size())};
  for (auto d : dims)
    for (int shift = 24; shift >= 0; shift -= 8) s += static_cast<char>((d >> shift) & 0xff);
  return s;
}

std::string gzip(const std::string& data) {
  z_stream zs{};
  deflateInit2(&zs, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&zs, data.size()) + 32, '\0');
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  zs.avail_in = static_cast<uInt>(data.size());
  zs.next_out = reinterpret_cast<Bytef*>(out.data());
  zs.avail_out = static_cast<uInt>(out.size());
  deflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

}  // namespace

// ---- CSV

TEST(csv, reads_numbers_with_and_without_header) {
  table t = parse_csv("a,b,c\n1,2,3\n4.5,-6e-1,+7\n", "f.csv");
  EXPECT_EQ(t.rows, 2);
  EXPECT_EQ(t.cols, 3);
  EXPECT_EQ(t.header, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(t.values, (std::vector<float>{1, 2, 3, 4.5f, -0.6f, 7}));
  EXPECT_EQ(t.line, (std::vector<std::int64_t>{2, 3}));
  table u = parse_csv("1,2\n3,4", "g.csv");  // no header, no final newline
  EXPECT_EQ(u.rows, 2);
  EXPECT_TRUE(u.header.empty());
  EXPECT_EQ(u.where(1), "g.csv:2");
}

TEST(csv, blank_lines_comments_crlf_bom_tabs_spaces) {
  table t = parse_csv("\xEF\xBB\xBF# x y\r\n\r\n1\t2\r\n\r\n 3\t4 \r\n", "f.tsv");
  EXPECT_EQ(t.rows, 2);
  EXPECT_EQ(t.cols, 2);
  EXPECT_EQ(t.line, (std::vector<std::int64_t>{3, 5}));
  table s = parse_csv("1 2  3\n4 5 6\n", "f.txt");  // numpy.savetxt's default
  EXPECT_EQ(s.cols, 3);
  EXPECT_EQ(s.values.back(), 6.0f);
  table q = parse_csv("\"x\",\"y\"\n\"1\",\"2\"\n", "q.csv");
  EXPECT_EQ(q.values, (std::vector<float>{1, 2}));
}

TEST(csv, errors_name_file_and_line) {
  EXPECT_EQ(error_of([] { parse_csv("1,2\n3\n", "f.csv"); }), "f.csv:2: expected 2 values, found 1");
  EXPECT_EQ(error_of([] { parse_csv("1,2\n\n3,abc\n", "f.csv"); }),
            "f.csv:3: non-numeric value 'abc' in column 2");
  EXPECT_EQ(error_of([] { parse_csv("x,1\n", "f.csv"); }),
            "f.csv:1: non-numeric value 'x' in column 1");
  EXPECT_EQ(error_of([] { parse_csv("1,,2\n", "f.csv"); }), "f.csv:1: empty value in column 2");
  EXPECT_EQ(error_of([] { parse_csv("1,nan\n", "f.csv"); }),
            "f.csv:1: non-finite value 'nan' in column 2");
  EXPECT_EQ(error_of([] { parse_csv("a\n-inf\n", "f.csv"); }),
            "f.csv:2: non-finite value '-inf' in column 1");
  EXPECT_EQ(error_of([] { parse_csv("1e999\n", "f.csv"); }),
            "f.csv:1: non-finite value '1e999' in column 1");
  EXPECT_EQ(error_of([] { parse_csv("1e300\n", "f.csv"); }),
            "f.csv:1: value '1e300' is out of float32 range in column 1");
  EXPECT_EQ(error_of([] { parse_csv("", "f.csv"); }), "f.csv: file is empty");
  EXPECT_EQ(error_of([] { parse_csv("a,b\n\n", "f.csv"); }), "f.csv: no data rows");
  EXPECT_EQ(error_of([] { parse_csv(std::string("1,\0", 3), "f.csv"); }),
            "f.csv:1: binary data in a CSV file");
}

TEST(csv, nonfinite_allowed_on_request) {
  read_options o;
  o.allow_nonfinite = true;
  table t = parse_csv("nan,inf\n", "f.csv", o);
  EXPECT_TRUE(std::isnan(t.values[0]));
  EXPECT_TRUE(std::isinf(t.values[1]));
}

// ---- NPY

TEST(npy, reads_float_int_and_big_endian) {
  table t = parse_npy(npy("<f4", "(2, 3)", floats({1, 2, 3, 4, 5, 6})), "a.npy");
  EXPECT_EQ(t.rows, 2);
  EXPECT_EQ(t.cols, 3);
  EXPECT_EQ(t.values[5], 6.0f);
  EXPECT_FALSE(t.integer_dtype);
  EXPECT_EQ(t.where(1), "a.npy: record 1");

  double d[3] = {0.5, -1, 2};
  table u = parse_npy(npy("<f8", "(3,)", std::string(reinterpret_cast<char*>(d), 24)), "b.npy");
  EXPECT_EQ(u.cols, 1);
  EXPECT_EQ(u.values, (std::vector<float>{0.5f, -1, 2}));

  std::int64_t i[2] = {7, 3};
  table v = parse_npy(npy("<i8", "(2,)", std::string(reinterpret_cast<char*>(i), 16), 2), "c.npy");
  EXPECT_TRUE(v.integer_dtype);
  EXPECT_EQ(v.values, (std::vector<float>{7, 3}));

  table w = parse_npy(npy(">f4", "(1,)", std::string("\x3f\x80\x00\x00", 4)), "d.npy");
  EXPECT_EQ(w.values[0], 1.0f);

  table x = parse_npy(npy("|u1", "(2, 2, 2)", std::string(8, '\x01')), "e.npy");
  EXPECT_EQ(x.rows, 2);
  EXPECT_EQ(x.cols, 4);
}

TEST(npy, corrupt_files) {
  EXPECT_EQ(error_of([] { parse_npy("\x93NUMPX\x01\x00", "a.npy"); }),
            "a.npy: not an NPY file (bad magic)");
  EXPECT_EQ(error_of([] { parse_npy("\x93NUMPY\x01", "a.npy"); }), "a.npy: truncated NPY header");
  EXPECT_EQ(error_of([] { parse_npy(std::string("\x93NUMPY\x09\x00\x10\x00", 10), "a.npy"); }),
            "a.npy: unsupported NPY format version 9.0");
  EXPECT_EQ(error_of([] { parse_npy(std::string("\x93NUMPY\x01\x00\xff\x00{", 11), "a.npy"); }),
            "a.npy: truncated NPY header (the header length is 255 bytes but only 1 follow)");
  EXPECT_EQ(error_of([] { parse_npy(npy("<f4", "(4, 2)", floats({1, 2, 3, 4, 5})), "a.npy"); }),
            "a.npy: truncated NPY data: the header declares shape (4, 2) of float32 (32 bytes) "
            "but only 20 bytes follow the header");
  EXPECT_EQ(error_of([] { parse_npy(npy("<f4", "(1,)", floats({1, 2})), "a.npy"); }),
            "a.npy: 4 unexpected bytes after the NPY data: the header declares shape (1,) of "
            "float32 (4 bytes)");
  EXPECT_EQ(error_of([] { parse_npy(npy("<c8", "(1,)", floats({1, 2})), "a.npy"); }),
            "a.npy: unsupported NPY dtype '<c8' (expected float32/float64 or an integer type)");
  EXPECT_EQ(error_of([] { parse_npy(npy("<f4", "()", floats({1})), "a.npy"); }),
            "a.npy: the NPY array is 0-dimensional (a single number); expected rows");
  EXPECT_EQ(error_of([] { parse_npy(npy("<f4", "(0, 3)", ""), "a.npy"); }),
            "a.npy: the array has no records (shape (0, 3))");
  EXPECT_EQ(error_of([] { parse_npy(npy("<f4", "(2,", ""), "a.npy"); }),
            "a.npy: corrupt NPY header (expected a dimension)");
  EXPECT_EQ(error_of([] { parse_npy(npy("<f4", "(1,)", floats({NAN})), "a.npy"); }),
            "a.npy: record 0: non-finite value nan");
  std::string fortran = npy("<f4", "(2, 1)", floats({1, 2}));
  fortran.replace(fortran.find("False"), 5, "True ");
  EXPECT_EQ(error_of([&] { parse_npy(fortran, "a.npy"); }),
            "a.npy: Fortran-order arrays are not supported (save the array in C order)");
}

TEST(npy, huge_shapes_are_rejected_without_allocating) {
  // 10^12 x 10^6 float32 would be 4 exabytes: the check against the file size comes first.
  EXPECT_EQ(error_of([] { parse_npy(npy("<f4", "(1000000000000, 1000000)", floats({1})), "h.npy"); }),
            "h.npy: truncated NPY data: the header declares shape (1000000000000, 1000000) of "
            "float32 (4000000000000000000 bytes) but only 4 bytes follow the header");
  EXPECT_EQ(error_of([] { parse_npy(npy("<f8", "(4294967296, 4294967296)", ""), "h.npy"); }),
            "h.npy: NPY header declares an impossible shape (4294967296, 4294967296)");
}

// ---- IDX and gzip

TEST(idx, reads_images_and_labels) {
  table images = parse_idx(idx_header(0x08, {2, 2, 3}) + std::string(12, '\x07'), "x-idx3-ubyte");
  EXPECT_EQ(images.rows, 2);
  EXPECT_EQ(images.cols, 6);
  EXPECT_EQ(images.values[0], 7.0f);
  EXPECT_TRUE(images.integer_dtype);
  table labels = parse_idx(idx_header(0x08, {3}) + std::string("\x00\x09\x02", 3), "y-idx1-ubyte");
  EXPECT_EQ(labels.values, (std::vector<float>{0, 9, 2}));
  table f = parse_idx(idx_header(0x0D, {1}) + std::string("\x3f\x80\x00\x00", 4), "f.idx");
  EXPECT_EQ(f.values[0], 1.0f);
}

TEST(idx, corrupt_files) {
  EXPECT_EQ(error_of([] { parse_idx(std::string("\x01\x00\x08\x01", 4), "x.idx"); }),
            "x.idx: not an IDX file (bad magic)");
  EXPECT_EQ(error_of([] { parse_idx(std::string("\x00\x00\x07\x01", 4), "x.idx"); }),
            "x.idx: not an IDX file (unknown element type 0x07)");
  EXPECT_EQ(error_of([] { parse_idx(std::string("\x00\x00\x08\x02\x00\x00", 6), "x.idx"); }),
            "x.idx: truncated IDX header");
  EXPECT_EQ(error_of([] { parse_idx(idx_header(0x08, {3, 4}) + std::string(5, 'a'), "x.idx"); }),
            "x.idx: truncated IDX data: the header declares shape (3, 4) of uint8 (12 bytes) but "
            "only 5 bytes follow the header");
  EXPECT_EQ(error_of([] {
              parse_idx(idx_header(0x0E, {0xffffffffu, 0xffffffffu, 0xffffffffu}), "x.idx");
            }),
            "x.idx: IDX header declares an impossible shape (4294967295, 4294967295, 4294967295)");
  EXPECT_EQ(error_of([] { parse_idx(idx_header(0x08, {}), "x.idx"); }),
            "x.idx: the IDX array is 0-dimensional (a single number); expected rows");
}

TEST(gzip, round_trip_and_corruption) {
  const std::string raw = idx_header(0x08, {2}) + "\x01\x02";
  const std::string z = gzip(raw);
  EXPECT_TRUE(is_gzip(z));
  EXPECT_EQ(gunzip(z, "a.gz"), raw);
  EXPECT_EQ(gunzip(z + z, "a.gz"), raw + raw);  // multi-member, as cat a.gz b.gz
  table t = parse_table(z, "labels-idx1-ubyte.gz");
  EXPECT_EQ(t.values, (std::vector<float>{1, 2}));
  EXPECT_EQ(error_of([&] { gunzip(z.substr(0, z.size() - 6), "a.gz"); }), "a.gz: truncated gzip data");
  std::string bad = z;
  bad[12] ^= 0x55;
  const std::string message = error_of([&] { gunzip(bad, "a.gz"); });
  EXPECT_EQ(message.rfind("a.gz: corrupt gzip data", 0), 0u) << message;
  EXPECT_EQ(error_of([&] { gunzip(z + "junk", "a.gz"); }),
            "a.gz: unexpected data after the end of the gzip stream");
}

TEST(gzip, expansion_is_bounded_by_the_deflate_limit) {
  // 64 MiB of zeros compresses to ~64 KiB; fine. The limit only stops impossible ratios,
  // which a well-formed stream cannot reach, so check the arithmetic on a real stream.
  const std::string zeros(1 << 20, '\0');
  const std::string z = gzip(zeros);
  EXPECT_EQ(gunzip(z, "z.gz").size(), zeros.size());
}

TEST(dispatch, by_name_then_by_content) {
  const std::string n = npy("<f4", "(1,)", floats({3}));
  EXPECT_EQ(parse_table(n, "x.npy").format, table_format::npy);
  EXPECT_EQ(parse_table(n, "x.bin").format, table_format::npy);
  EXPECT_EQ(parse_table(idx_header(0x08, {1}) + "a", "x.bin").format, table_format::idx);
  EXPECT_EQ(parse_table("1,2\n", "x.bin").format, table_format::csv);
  EXPECT_EQ(error_of([&] { parse_table("1,2\n", "x.npy"); }), "x.npy: not an NPY file (bad magic)");
}

TEST(files, missing_empty_directory) {
  EXPECT_EQ(error_of([] { read_file("/nonexistent/softce.csv"); }),
            "/nonexistent/softce.csv: no such file");
  EXPECT_EQ(error_of([] { read_file("/tmp"); }), "/tmp: is a directory, not a file");
  EXPECT_EQ(error_of([] { read_file("/dev/null"); }), "/dev/null: file is empty");
}

TEST(read_file, devices_and_bombs_are_bounded) {
  // /dev/zero has no size: its first bytes are judged (an IDX header of type 0x00)
  EXPECT_EQ(error_of([] { read_file("/dev/zero"); }),
            "/dev/zero: not an IDX file (unknown element type 0x00)");
  // gzip: the NPY header's size bounds the expansion
  std::string npy = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  npy = std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(npy.size() + 1) + '\0' + npy + "\n";
  std::string raw = npy + std::string(8, '\0') + std::string(8 << 20, '\0');
  uLongf size = compressBound(raw.size());
  std::string z(size + 32, '\0');
  z_stream zs{};
  ASSERT_EQ(deflateInit2(&zs, 9, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
  zs.next_in = reinterpret_cast<Bytef*>(raw.data());
  zs.avail_in = static_cast<uInt>(raw.size());
  zs.next_out = reinterpret_cast<Bytef*>(z.data());
  zs.avail_out = static_cast<uInt>(z.size());
  ASSERT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  z.resize(zs.total_out);
  deflateEnd(&zs);
  EXPECT_EQ(error_of([&] { gunzip(z, "b.npy.gz"); }),
            "b.npy.gz: more data than its NPY header declares (" +
                std::to_string(npy.size() + 8) + " bytes in all)");
}
