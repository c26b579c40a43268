#!/usr/bin/env python3
"""End-to-end tests of the `softce` program (Python standard library only).

Run by ctest (tests/cli/CMakeLists.txt), one test class per ctest test:
    SOFTCE=build/tools/softce python3 tests/cli/test_cli.py -v BadInput
Every bad input is checked for its exit code (2), its exact one-line message naming the file
and line/record, and for leaving no output behind. Data is generated here, small and seeded.
"""
import array
import gzip
import io
import json
import math
import os
import pty
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

SOFTCE = os.environ.get("SOFTCE", "softce")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------------------------------
# writers for the three input formats

def write_csv(path, rows, header=None):
    with open(path, "w") as f:
        if header:
            f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(repr(v) if isinstance(v, float) else str(v) for v in row) + "\n")


def npy_bytes(values, shape, descr="<f4", data=None):
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (
        descr, ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else ""))
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    out = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
    if data is None:
        code = {"<f4": "f", "<f8": "d", "<i8": "q", "<i4": "i"}[descr]
        flat = [v for row in values for v in row] if values and isinstance(values[0], list) \
            else list(values)
        data = array.array(code, flat).tobytes()
    return out + data


def write_npy(path, values, shape, descr="<f4", data=None):
    with open(path, "wb") as f:
        f.write(npy_bytes(values, shape, descr, data))


def idx_bytes(type_code, dims, data):
    return bytes([0, 0, type_code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + data


def gz(data):
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
        f.write(data)
    return buffer.getvalue()


def blobs(n, dims=4, classes=3, seed=0):
    """Gaussian blobs: feature d is large for class d % classes."""
    rng = random.Random(seed)
    x, y = [], []
    for _ in range(n):
        c = rng.randrange(classes)
        x.append([round((3.0 if d % classes == c else 0.0) + rng.gauss(0, 0.7), 4)
                  for d in range(dims)])
        y.append(c)
    return x, y


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_text(path):
    with open(path) as f:
        return f.read()


def read_png_size(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR", "no IHDR chunk"
    assert data[-8:-4] == b"IEND", "no IEND chunk at the end"
    return struct.unpack(">II", data[16:24])


class CliTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="softce-cli-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def run_softce(self, *args, timeout=120):
        return subprocess.run([SOFTCE, *args], cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout)

    def listing(self):
        found = []
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                found.append(os.path.relpath(os.path.join(root, name), self.dir))
        return sorted(found)

    def assert_bad(self, args, message):
        """Exit code 2, exactly one message line, and nothing written."""
        before = self.listing()
        result = self.run_softce(*args)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr, "softce: error: " + message + "\n")
        self.assertEqual(result.stdout, "")
        self.assertEqual(self.listing(), before, "output left behind")

    def ok(self, *args):
        result = self.run_softce(*args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def dataset(self, n=150, val=60):
        x, y = blobs(n + val, seed=1)
        write_csv(self.path("x.csv"), x[:n], header=["f1", "f2", "f3", "f4"])
        write_csv(self.path("y.csv"), [[v] for v in y[:n]], header=["label"])
        write_csv(self.path("vx.csv"), x[n:])
        write_csv(self.path("vy.csv"), [[v] for v in y[n:]])
        return x, y


TRAIN = ["train", "--features", "x.csv", "--targets", "y.csv", "--out", "out", "--epochs", "2",
         "--threads", "1", "--progress", "none"]


class BadInput(CliTest):
    def setUp(self):
        super().setUp()
        self.dataset(n=6, val=3)

    def train_with(self, **files):
        args = list(TRAIN)
        for option, value in files.items():
            flag = "--" + option.replace("_", "-")
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        return args

    def test_ragged_csv(self):
        with open(self.path("bad.csv"), "w") as f:
            f.write("a,b,c,d\n1,2,3,4\n1,2,3\n")
        self.assert_bad(self.train_with(features="bad.csv"), "bad.csv:3: expected 4 values, found 3")

    def test_non_numeric_csv(self):
        with open(self.path("bad.csv"), "w") as f:
            f.write("1,2,3,4\n5,6,seven,8\n")
        self.assert_bad(self.train_with(features="bad.csv"),
                        "bad.csv:2: non-numeric value 'seven' in column 3")

    def test_nan_and_inf(self):
        with open(self.path("bad.csv"), "w") as f:
            f.write("1,2,3,4\n5,6,nan,8\n")
        self.assert_bad(self.train_with(features="bad.csv"),
                        "bad.csv:2: non-finite value 'nan' in column 3")
        write_npy(self.path("t.npy"), [[0.5, 0.5]] * 3 + [[math.inf, 0.0]] + [[1.0, 0.0]] * 2,
                  (6, 2))
        self.assert_bad(self.train_with(targets="t.npy"),
                        "t.npy: record 3: non-finite value inf in column 1")

    def test_negative_probability(self):
        write_csv(self.path("t.csv"), [[0.5, 0.5]] * 4 + [[-0.25, 1.25], [1.0, 0.0]])
        self.assert_bad(self.train_with(targets="t.csv"),
                        "t.csv:5: negative probability -0.25 in column 1")

    def test_rows_not_summing_to_one_unless_normalize(self):
        write_csv(self.path("t.csv"), [[0.5, 0.5]] * 2 + [[0.6, 0.6]] + [[1.0, 0.0]] * 3)
        self.assert_bad(self.train_with(targets="t.csv"),
                        "t.csv:3: probabilities sum to 1.2 (tolerance 0.001; --normalize "
                        "rescales rows)")
        self.ok(*self.train_with(targets="t.csv"), "--normalize")
        self.assertTrue(os.path.exists(self.path("out/model.json")))

    def test_row_count_mismatch(self):
        write_csv(self.path("t.csv"), [[0], [1], [2]])
        self.assert_bad(self.train_with(targets="t.csv"),
                        "t.csv: 3 rows, but x.csv has 6 (one row per feature row is needed)")

    def test_class_count_mismatch(self):
        write_csv(self.path("t.csv"), [[0.5, 0.5, 0.0]] * 6)
        write_csv(self.path("vt.csv"), [[0.25, 0.25, 0.25, 0.25]] * 3)
        self.assert_bad(self.train_with(targets="t.csv", val_features="vx.csv",
                                        val_targets="vt.csv"),
                        "vt.csv: 4 columns (classes), but the training targets have 3 classes")
        write_csv(self.path("teacher.csv"), [[1.0, 2.0]] * 6)
        self.assert_bad(self.train_with(targets="t.csv", teacher_logits="teacher.csv"),
                        "teacher.csv: 2 columns (teacher logits), but the targets have 3 classes")
        write_csv(self.path("vy.csv"), [[0], [5], [1]])
        self.assert_bad(self.train_with(val_features="vx.csv", val_targets="vy.csv"),
                        "vy.csv:2: class index 5 is out of range for 3 classes")
        self.assert_bad(self.train_with(targets="t.csv", classes="4"),
                        "t.csv: 3 probability columns but 4 classes")

    def test_feature_count_mismatch(self):
        write_csv(self.path("vx.csv"), [[1, 2, 3]] * 3)
        self.assert_bad(self.train_with(val_features="vx.csv", val_targets="vy.csv"),
                        "vx.csv: 3 columns, but x.csv has 4")

    def test_corrupt_npy(self):
        with open(self.path("a.npy"), "wb") as f:
            f.write(b"\x93NUMPX\x01\x00" + b"\x00" * 100)
        self.assert_bad(self.train_with(features="a.npy"), "a.npy: not an NPY file (bad magic)")
        data = array.array("f", [1.0] * 20).tobytes()
        write_npy(self.path("b.npy"), None, (6, 4), data=data)
        self.assert_bad(self.train_with(features="b.npy"),
                        "b.npy: truncated NPY data: the header declares shape (6, 4) of float32 "
                        "(96 bytes) but only 80 bytes follow the header")
        write_npy(self.path("c.npy"), None, (5, 4), data=array.array("f", [1.0] * 24).tobytes())
        self.assert_bad(self.train_with(features="c.npy"),
                        "c.npy: 16 unexpected bytes after the NPY data: the header declares shape "
                        "(5, 4) of float32 (80 bytes)")
        with open(self.path("d.npy"), "wb") as f:
            f.write(npy_bytes(None, (6, 4), data=b"")[:30])
        self.assert_bad(self.train_with(features="d.npy"),
                        "d.npy: truncated NPY header (the header length is 118 bytes but only 20 "
                        "follow)")

    def test_huge_shapes_fail_fast(self):
        write_npy(self.path("h.npy"), None, (10**12, 10**6), data=b"\x00" * 16)
        start = time.monotonic()
        self.assert_bad(self.train_with(features="h.npy"),
                        "h.npy: truncated NPY data: the header declares shape (1000000000000, "
                        "1000000) of float32 (4000000000000000000 bytes) but only 16 bytes follow "
                        "the header")
        with open(self.path("h-idx3-ubyte"), "wb") as f:
            f.write(idx_bytes(0x0E, [0xFFFFFFFF] * 3, b""))
        self.assert_bad(self.train_with(features="h-idx3-ubyte"),
                        "h-idx3-ubyte: IDX header declares an impossible shape (4294967295, "
                        "4294967295, 4294967295)")
        self.assertLess(time.monotonic() - start, 10)

    def test_corrupt_idx(self):
        with open(self.path("a-idx3-ubyte"), "wb") as f:
            f.write(b"\x01\x02\x08\x03" + b"\x00" * 40)
        self.assert_bad(self.train_with(features="a-idx3-ubyte"),
                        "a-idx3-ubyte: not an IDX file (bad magic)")
        with open(self.path("b-idx3-ubyte"), "wb") as f:
            f.write(idx_bytes(0x08, [6, 2, 2], b"\x01" * 20))
        self.assert_bad(self.train_with(features="b-idx3-ubyte"),
                        "b-idx3-ubyte: truncated IDX data: the header declares shape (6, 2, 2) of "
                        "uint8 (24 bytes) but only 20 bytes follow the header")
        with open(self.path("c-idx3-ubyte.gz"), "wb") as f:
            f.write(gz(idx_bytes(0x08, [6, 2, 2], b"\x01" * 24))[:-10])
        self.assert_bad(self.train_with(features="c-idx3-ubyte.gz"),
                        "c-idx3-ubyte.gz: truncated gzip data")
        with open(self.path("y-idx1-ubyte"), "wb") as f:
            f.write(idx_bytes(0x08, [6], b"\x00\x01\x02\x00\x01\x02"))
        self.ok(*self.train_with(targets="y-idx1-ubyte"))  # a good IDX file is read

    def test_empty_and_missing_files(self):
        open(self.path("empty.csv"), "w").close()
        self.assert_bad(self.train_with(features="empty.csv"), "empty.csv: file is empty")
        with open(self.path("header.csv"), "w") as f:
            f.write("a,b,c,d\n")
        self.assert_bad(self.train_with(features="header.csv"), "header.csv: no data rows")
        self.assert_bad(self.train_with(features="missing.csv"), "missing.csv: no such file")
        self.assert_bad(self.train_with(targets="missing.npy"), "missing.npy: no such file")

    def test_unwritable_output(self):
        self.assert_bad(self.train_with(out="x.csv"), "x.csv: exists and is not a directory")
        self.assert_bad(self.train_with(out="x.csv/out"),
                        "x.csv/out: cannot create the output directory: Not a directory")
        self.assert_bad(self.train_with(out="/proc/softce-test"),
                        "/proc/softce-test: cannot create the output directory: No such file or "
                        "directory")
        self.ok(*TRAIN)
        self.assert_bad(["predict", "--model", "out", "--features", "x.csv", "--out",
                         "nodir/p.csv"],
                        "nodir: cannot write there: No such file or directory")
        self.assert_bad(["predict", "--model", "out", "--features", "x.csv", "--out", "out"],
                        "out: is a directory (--out names the output file)")

    def test_bad_options(self):
        self.assert_bad(self.train_with(model="mlp:x"),
                        "invalid --model 'mlp:x' (expected linear or mlp:H[,H2...] with hidden "
                        "sizes 1..65536)")
        self.assert_bad(self.train_with(epochs="0"),
                        "--epochs: must be an integer in [1, 100000], not 0")
        self.assert_bad(self.train_with(loss="mse"),
                        "--loss must be cross_entropy or kl, not 'mse'")
        result = self.run_softce("train", "--targets", "y.csv", "--out", "out")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--features", result.stderr)
        self.assertFalse(os.path.exists(self.path("out")))

    def test_predict_bad_inputs(self):
        self.ok(*TRAIN)
        write_csv(self.path("x3.csv"), [[1, 2, 3]])
        self.assert_bad(["predict", "--model", "out/model.json", "--features", "x3.csv", "--out",
                         "p.csv"],
                        "x3.csv: 3 columns, but the model out/model.json takes 4 features")
        with open(self.path("m.json"), "w") as f:
            f.write('{"format": "softce-model", "version": 1, "inputs": 4}')
        self.assert_bad(["predict", "--model", "m.json", "--features", "x.csv", "--out", "p.csv"],
                        "m.json: not a valid softce model file ([json.exception.out_of_range.403] "
                        "key 'classes' not found)")

    def test_earlier_outputs_survive_a_failed_run(self):
        self.ok(*TRAIN)
        with open(self.path("out/model.json"), "rb") as f:
            model = f.read()
        write_csv(self.path("t.csv"), [[0], [1], [2]])
        self.assert_bad(self.train_with(targets="t.csv"),
                        "t.csv: 3 rows, but x.csv has 6 (one row per feature row is needed)")
        with open(self.path("out/model.json"), "rb") as f:
            self.assertEqual(f.read(), model)


class TrainPredict(CliTest):
    def test_round_trip(self):
        x, y = self.dataset()
        result = self.ok("train", "--features", "x.csv", "--targets", "y.csv", "--val-features",
                         "vx.csv", "--val-targets", "vy.csv", "--model", "mlp:16", "--epochs",
                         "5", "--lr", "0.01", "--seed", "3", "--threads", "2", "--out", "run")
        # not a terminal: one plain line per epoch
        self.assertIn("train epoch 5/5  loss ", result.stderr)
        self.assertNotIn("\r", result.stderr)
        metrics = load_json(self.path("run/metrics.json"))
        self.assertGreater(metrics["validation"]["accuracy"], 0.9)
        self.assertEqual(len(metrics["epochs"]), 5)
        self.assertEqual(metrics["architecture"], "mlp:16")
        model = load_json(self.path("run/model.json"))
        self.assertEqual(model["format"], "softce-model")
        self.assertEqual(model["classes"], 3)

        for name in ("p.csv", "p.npy"):
            self.ok("predict", "--model", "run", "--features", "vx.csv", "--out", name)
        with open(self.path("p.csv")) as f:
            probs = [[float(v) for v in line.split(",")] for line in f]
        self.assertEqual(len(probs), 60)
        for row in probs:
            self.assertEqual(len(row), 3)
            self.assertAlmostEqual(sum(row), 1.0, places=5)
        correct = sum(max(range(3), key=row.__getitem__) == label
                      for row, label in zip(probs, y[150:]))
        self.assertEqual(correct / 60, metrics["validation"]["accuracy"])
        with open(self.path("p.npy"), "rb") as f:
            raw = f.read()
        self.assertTrue(raw.startswith(b"\x93NUMPY"))
        self.assertIn(b"'shape': (60, 3)", raw)
        # predictions are valid targets
        self.assertEqual(self.ok("check-targets", "p.csv").stdout,
                         "p.csv: OK: 60 rows of probabilities, 3 classes\n")

        # same seed and threads: the same model, byte for byte
        self.ok("train", "--features", "x.csv", "--targets", "y.csv", "--val-features", "vx.csv",
                "--val-targets", "vy.csv", "--model", "mlp:16", "--epochs", "5", "--lr", "0.01",
                "--seed", "3", "--threads", "2", "--out", "run2")
        self.assertEqual(read_text(self.path("run/model.json")),
                         read_text(self.path("run2/model.json")))

    def test_one_hot_targets_equal_index_targets(self):
        x, y = self.dataset()
        write_npy(self.path("onehot.npy"), [[1.0 if c == v else 0.0 for c in range(3)]
                                            for v in y[:150]], (150, 3))
        common = ["--features", "x.csv", "--model", "mlp:8", "--epochs", "3", "--threads", "1",
                  "--progress", "none"]
        self.ok("train", *common, "--targets", "y.csv", "--out", "a")
        self.ok("train", *common, "--targets", "onehot.npy", "--out", "b")
        ma, mb = (load_json(self.path(d + "/model.json")) for d in "ab")
        self.assertEqual(ma["layers"], mb["layers"])
        ea, eb = (load_json(self.path(d + "/metrics.json"))["epochs"] for d in "ab")
        self.assertEqual([e["train_loss"] for e in ea], [e["train_loss"] for e in eb])

    def test_soft_targets_kl_topk_distillation_idx(self):
        x, y = self.dataset()
        soft = [[0.8 if c == v else 0.1 for c in range(3)] for v in y[:150]]
        write_csv(self.path("soft.csv"), soft)
        common = ["--features", "x.csv", "--epochs", "3", "--threads", "1", "--progress", "none"]
        self.ok("train", *common, "--targets", "soft.csv", "--out", "ce")
        self.ok("train", *common, "--targets", "soft.csv", "--loss", "kl", "--out", "kl")
        ce, kl = (load_json(self.path(d + "/metrics.json")) for d in ("ce", "kl"))
        h = -(0.8 * math.log(0.8) + 2 * 0.1 * math.log(0.1))  # every row has entropy h
        for a, b in zip(ce["epochs"], kl["epochs"]):
            self.assertAlmostEqual(a["train_loss"] - h, b["train_loss"], places=5)
        # top-k: the two most likely classes of each row
        topk = [[v, (v + 1) % 3, 0.8, 0.1] for v in y[:150]]
        write_csv(self.path("topk.csv"), topk)
        self.ok("train", *common, "--targets", "topk.csv", "--targets-format", "topk",
                "--classes", "3", "--out", "topk")
        self.ok("train", *common, "--targets", "topk.csv", "--targets-format", "topk",
                "--classes", "3", "--topk-tail", "--out", "tail")
        # distillation from a teacher's logits
        self.ok("predict", "--model", "ce", "--features", "x.csv", "--out", "teacher.npy",
                "--output", "logits")
        self.ok("train", *common, "--targets", "y.csv", "--teacher-logits", "teacher.npy",
                "--temperature", "2", "--alpha", "0.3", "--label-smoothing", "0.1",
                "--out", "student")
        config = load_json(self.path("student/metrics.json"))["config"]
        self.assertEqual((config["temperature"], config["alpha"]), (2.0, 0.3))
        # IDX input (float32 features, uint8 labels), gzip'd
        data = struct.pack(">%df" % (150 * 4), *[v for row in x[:150] for v in row])
        with open(self.path("x-idx2-float.gz"), "wb") as f:
            f.write(gz(idx_bytes(0x0D, [150, 4], data)))
        with open(self.path("y-idx1-ubyte"), "wb") as f:
            f.write(idx_bytes(0x08, [150], bytes(y[:150])))
        self.ok("train", "--features", "x-idx2-float.gz", "--targets", "y-idx1-ubyte",
                "--epochs", "1", "--threads", "1", "--out", "idx", "--progress", "none")

    def test_progress_bar_on_a_terminal(self):
        self.dataset()
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(self.dir)
            os.execv(SOFTCE, [SOFTCE, "train", "--features", "x.csv", "--targets", "y.csv",
                              "--epochs", "2", "--threads", "1", "--out", "tty"])
        output = b""
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0, output)
        text = output.decode()
        self.assertIn("\r\x1b[K", text)  # the bar is redrawn in place
        self.assertIn("ETA", text)
        self.assertIn("%", text)


class CheckTargets(CliTest):
    def test_valid(self):
        write_csv(self.path("t.csv"), [[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]], header=["a", "b"])
        self.assertEqual(self.ok("check-targets", "t.csv").stdout,
                         "t.csv: OK: 3 rows of probabilities, 2 classes\n")
        write_csv(self.path("y.csv"), [[0], [4], [2]])
        self.assertEqual(self.ok("check-targets", "y.csv").stdout,
                         "y.csv: OK: 3 rows of class indices, 5 classes\n")

    def test_lists_every_bad_row(self):
        with open(self.path("t.csv"), "w") as f:
            f.write("a,b,c\n0.2,0.3,0.5\n-0.1,0.6,0.5\n0.2,0.3,0.5\nnan,0.5,0.5\n"
                    "0.5,0.5,0.5\n1,0,0\n")
        result = self.run_softce("check-targets", "t.csv")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout,
                         "t.csv:3: negative probability -0.1 in column 1\n"
                         "t.csv:5: non-finite probability nan in column 1\n"
                         "t.csv:6: probabilities sum to 1.5 (tolerance 0.001; --normalize "
                         "rescales rows)\n")
        self.assertEqual(result.stderr,
                         "softce: error: t.csv: 3 of 6 rows are not valid probabilities\n")
        result = self.run_softce("check-targets", "t.csv", "--max-report", "1")
        self.assertEqual(result.stdout,
                         "t.csv:3: negative probability -0.1 in column 1\n... and 2 more\n")
        result = self.run_softce("check-targets", "t.csv", "--tolerance", "0.6")
        self.assertEqual(result.stdout.count("\n"), 2)

    def test_unreadable(self):
        self.assert_bad(["check-targets", "nope.csv"], "nope.csv: no such file")
        with open(self.path("r.csv"), "w") as f:
            f.write("0.5,0.5\n1\n")
        self.assert_bad(["check-targets", "r.csv"], "r.csv:2: expected 2 values, found 1")


class Interrupt(CliTest):
    """SIGINT during training: exit 130, earlier outputs intact, nothing else left."""

    def long_run(self, out):
        rng = random.Random(5)
        n, d = 4000, 64
        write_npy(self.path("big_x.npy"), None, (n, d),
                  data=array.array("f", [rng.random() for _ in range(n * d)]).tobytes())
        write_npy(self.path("big_y.npy"), None, (n,),
                  data=array.array("q", [rng.randrange(4) for _ in range(n)]).tobytes(),
                  descr="<i8")
        return subprocess.Popen(
            [SOFTCE, "train", "--features", "big_x.npy", "--targets", "big_y.npy", "--model",
             "mlp:256,256", "--epochs", "1000", "--threads", "1", "--progress", "lines",
             "--out", out], cwd=self.dir, stderr=subprocess.PIPE, text=True)

    def interrupt(self, process):
        line = process.stderr.readline()  # the first epoch is done: training is under way
        self.assertIn("epoch 1/1000", line)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 130, stderr)
        self.assertTrue(stderr.endswith(
            "softce: interrupted; no output written, earlier outputs unchanged\n"), stderr)

    def test_earlier_outputs_intact(self):
        self.dataset(n=20, val=0)
        self.ok(*TRAIN)
        before = {name: read_bytes(self.path("out/" + name))
                  for name in ("model.json", "metrics.json")}
        self.interrupt(self.long_run("out"))
        self.assertEqual(sorted(os.listdir(self.path("out"))), ["metrics.json", "model.json"])
        for name, content in before.items():
            self.assertEqual(read_bytes(self.path("out/" + name)), content)

    def test_new_directory_removed(self):
        self.interrupt(self.long_run("fresh/run"))
        self.assertFalse(os.path.exists(self.path("fresh")))


class Demo(CliTest):
    def synthetic_fashion_mnist(self, directory, train=600, test=200):
        """Four gzip'd IDX files shaped like Fashion-MNIST: 28x28 images, 10 classes."""
        os.makedirs(directory)
        rng = random.Random(7)

        def images(n):
            labels = [rng.randrange(10) for _ in range(n)]
            pixels = bytearray()
            for c in labels:
                for i in range(784):
                    row = i // 28
                    base = 200 if 2 * c <= row < 2 * c + 6 else 20
                    pixels.append(max(0, min(255, base + rng.randrange(-40, 40))))
            return labels, bytes(pixels)

        for prefix, n in (("train", train), ("t10k", test)):
            labels, pixels = images(n)
            with open(os.path.join(directory, prefix + "-images-idx3-ubyte.gz"), "wb") as f:
                f.write(gz(idx_bytes(0x08, [n, 28, 28], pixels)))
            with open(os.path.join(directory, prefix + "-labels-idx1-ubyte.gz"), "wb") as f:
                f.write(gz(idx_bytes(0x08, [n], bytes(labels))))

    def check_results(self, out, stdout):
        results = load_json(os.path.join(out, "results.json"))
        models = {"teacher": results["teacher"], **results["students"]}
        self.assertEqual(sorted(results["students"]),
                         ["distilled", "hard", "label_smoothing", "one_hot"])
        for name, r in models.items():
            for key in ("accuracy", "nll", "ece"):
                self.assertIsInstance(r[key], float, name + "." + key)
            self.assertTrue(0 <= r["accuracy"] <= 1 and r["nll"] > 0 and 0 <= r["ece"] <= 1)
        hard, one_hot = results["students"]["hard"], results["students"]["one_hot"]
        # the forum's answer: one-hot probability targets train exactly like index targets
        for key in ("accuracy", "nll", "ece"):
            self.assertEqual(hard[key], one_hot[key], key)
        self.assertEqual([e["train_loss"] for e in hard["epochs"]],
                         [e["train_loss"] for e in one_hot["epochs"]])
        self.assertTrue(results["one_hot_equals_hard"]["identical"])
        # CE = H(target) + KL, and CE at a perfect prediction is H(target), not 0
        self.assertEqual(len(results["decomposition"]), 4)
        for d in results["decomposition"]:
            self.assertLess(abs(d["ce_minus_entropy_minus_kl"]), 1e-5, d)
            self.assertAlmostEqual(d["cross_entropy_at_perfect_prediction"], d["entropy"],
                                   places=5)
            self.assertLess(abs(d["kl_at_perfect_prediction"]), 1e-5)
        self.assertGreater(results["decomposition"][1]["entropy"], 0.4)  # smoothed: ~0.50
        for chart in ("reliability.png", "accuracy_nll.png"):
            self.assertIn(chart, results["charts"])
            width, height = read_png_size(os.path.join(out, chart))
            self.assertGreater(width, 500)
            self.assertGreater(height, 300)
        self.assertIn("one_hot vs hard: IDENTICAL", stdout)
        for name in models:
            self.assertIn(name, stdout)
        self.assertIn("CE(target, q) = H(target) + KL(target || q)", stdout)
        return results

    def test_reduced_demo_on_synthetic_data(self):
        self.synthetic_fashion_mnist(self.path("data"))
        result = self.ok("demo", "--data", "data", "--out", "demo", "--quick", "--threads", "2",
                         "--progress", "none")
        results = self.check_results(self.path("demo"), result.stdout)
        self.assertTrue(results["config"]["reduced"])
        self.assertEqual(results["config"]["train_rows"], 600)
        self.assertGreater(results["teacher"]["accuracy"], 0.5)
        self.assertEqual(sorted(os.listdir(self.path("demo"))),
                         ["accuracy_nll.png", "noisy_accuracy_nll.png", "noisy_reliability.png",
                          "reliability.png", "results.json"])
        self.check_noisy(results, result.stdout)
        # deterministic for a seed and a thread count
        self.ok("demo", "--data", "data", "--out", "again", "--quick", "--threads", "2",
                "--progress", "none")
        again = load_json(self.path("again/results.json"))
        for name in ("hard", "distilled"):
            self.assertEqual(again["students"][name]["epochs"], results["students"][name]["epochs"])

    def check_noisy(self, results, stdout):
        """The noisy-votes scenario: five targets from the same votes, three seeds each."""
        noisy = results["noisy"]
        self.assertEqual(sorted(noisy["students"]),
                         ["clean", "dawid_skene", "majority", "majority_ls", "vote_fractions"])
        for name, r in noisy["students"].items():
            for key in ("accuracy", "nll", "ece", "ambiguous_accuracy", "ambiguous_nll"):
                self.assertEqual(len(r[key]["seeds"]), 3, name + "." + key)
                mean = sum(r[key]["seeds"]) / 3
                self.assertAlmostEqual(r[key]["mean"], mean, places=12)
                std = math.sqrt(sum((v - mean) ** 2 for v in r[key]["seeds"]) / 2)
                self.assertAlmostEqual(r[key]["std"], std, places=12)
        self.assertEqual(len(noisy["simulation"]["annotators"]), 5)
        # the careless annotator (60% uniform votes) is the worst, and Dawid-Skene sees it
        annotators = noisy["simulation"]["annotators"]
        self.assertEqual(min(range(5), key=lambda j: annotators[j]["actual_accuracy"]), 4)
        self.assertEqual(min(range(5), key=lambda j: annotators[j]["dawid_skene_accuracy"]), 4)
        self.assertIn("Noisy votes: 5 simulated annotators", stdout)
        for name in noisy["students"]:
            self.assertIn(name, stdout)

    def test_noisy_scenario_alone(self):
        self.synthetic_fashion_mnist(self.path("data"))
        result = self.ok("demo", "--scenario", "noisy", "--data", "data", "--out", "noisy",
                         "--quick", "--threads", "2", "--progress", "none")
        results = load_json(self.path("noisy/results.json"))
        self.assertNotIn("students", results)
        self.check_noisy(results, result.stdout)
        self.assertEqual(sorted(os.listdir(self.path("noisy"))),
                         ["noisy_accuracy_nll.png", "noisy_reliability.png", "results.json"])
        self.assert_bad(["demo", "--scenario", "loud", "--data", "data", "--out", "x", "--quick"],
                        "--scenario must be all, basic or noisy, not 'loud'")

    def test_reduced_demo_on_fashion_mnist(self):
        # scripts/setup.sh installs dataset-fashion-mnist: its absence is a failure, not a skip
        self.assertTrue(os.path.isdir(FASHION_MNIST), FASHION_MNIST + " missing (dataset-fashion-mnist)")
        result = self.ok("demo", "--out", "demo", "--quick", "--threads", "2", "--progress", "none")
        self.check_results(self.path("demo"), result.stdout)

    def test_missing_or_corrupt_data(self):
        self.assert_bad(["demo", "--data", "nowhere", "--out", "demo"],
                        "Fashion-MNIST not found: nowhere has no train-images-idx3-ubyte[.gz]. "
                        "Install the Debian package dataset-fashion-mnist (apt-get install "
                        "dataset-fashion-mnist, which puts the IDX files in "
                        "/usr/share/datasets/fashion-mnist) or pass --data DIR with the four IDX "
                        "files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (gzip'd or not)")
        self.synthetic_fashion_mnist(self.path("data"), train=50, test=20)
        with open(self.path("data/t10k-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(gz(idx_bytes(0x08, [20], bytes(range(19)) + b"\x0c")))
        self.assert_bad(["demo", "--data", "data", "--out", "demo", "--quick"],
                        "data/t10k-labels-idx1-ubyte.gz: record 10: class index 10 is out of "
                        "range for 10 classes")


class Install(CliTest):
    def test_cmake_install_puts_softce_in_bin(self):
        build = os.environ.get("SOFTCE_BUILD_DIR")
        self.assertTrue(build, "SOFTCE_BUILD_DIR not set (ctest sets it)")
        cmake = os.environ.get("CMAKE_COMMAND", "cmake")
        prefix = self.path("prefix")
        result = subprocess.run([cmake, "--install", build, "--prefix", prefix],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        program = os.path.join(prefix, "bin", "softce")
        self.assertTrue(os.access(program, os.X_OK), "no bin/softce in the install")
        version = subprocess.run([program, "--version"], capture_output=True, text=True)
        self.assertEqual(version.returncode, 0)
        self.assertTrue(version.stdout.startswith("softce "), version.stdout)


if __name__ == "__main__":
    unittest.main()
