#!/usr/bin/env python3
"""Hostile-input corpus for the `softce` program (Python standard library only).

Run by ctest as cli.e2e.Hostile (tests/cli/CMakeLists.txt):
    SOFTCE=build/tools/softce python3 tests/cli/test_hostile.py -v

Every case is a small input (or option) built to make the program crash, hang, allocate
without bound, cast out of range or leave a partial output. Each checks:
  - the exit code (2 for bad input, 128 + signal for a signal),
  - that the one-line message names the file[:line] / record, or the option,
  - that no output file was written or changed (the whole directory is compared),
  - bounded memory: the child runs under RLIMIT_AS = 2 GiB, so an unbounded allocation
    ends in exit code 1 ("out of memory") or a crash, and fails the test,
  - promptness: a timeout on every run.
"""
import array
import base64
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cli import SOFTCE, blobs, idx_bytes, npy_bytes, write_csv, write_npy  # noqa: E402

MEMORY_LIMIT = 2 << 30  # bytes of address space for the child


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def child_env(**extra):
    env = dict(os.environ)
    env["OPENBLAS_NUM_THREADS"] = "1"  # OpenBLAS's per-thread buffers count against the limit
    env.update(extra)
    return env


def gzip_bomb(prefix, zeros):
    """gzip of `prefix` followed by `zeros` zero bytes, built without holding them."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [c.compress(prefix)]
    chunk = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(c.compress(chunk))
    out.append(c.flush())
    return b"".join(out)


class Hostile(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="softce-hostile-")
        x, y = blobs(12, seed=2)
        write_csv(self.path("x.csv"), x)
        write_csv(self.path("y.csv"), [[v] for v in y])

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def snapshot(self):
        """Every entry under the test directory: kind and content hash (FIFOs not opened)."""
        found = {}
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                p = os.path.join(root, name)
                st = os.lstat(p)
                if os.path.islink(p):
                    found[p] = ("link", os.readlink(p))
                elif os.path.isfile(p):
                    with open(p, "rb") as f:
                        found[p] = ("file", hashlib.sha256(f.read()).hexdigest())
                else:
                    found[p] = ("other", st.st_mode)
        return found

    def start(self, args, **env):
        return subprocess.Popen([SOFTCE, *args], cwd=self.dir, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=limit_memory,
                                env=child_env(**env))

    def run_limited(self, args, timeout=60, **env):
        p = self.start(args, **env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            self.fail("softce %s did not finish within %d s" % (" ".join(args), timeout))
        return p.returncode, out, err

    def assert_refused(self, args, message, exact=True, timeout=60, **env):
        """Exit 2, one message line naming the culprit, nothing written or changed."""
        before = self.snapshot()
        code, out, err = self.run_limited(args, timeout=timeout, **env)
        self.assertEqual(code, 2, "exit code %d (1 = out of memory or internal error): %s"
                         % (code, err))
        if exact:
            self.assertEqual(err, "softce: error: " + message + "\n")
        else:
            self.assertTrue(err.startswith("softce: error: "), err)
            self.assertIn(message, err)
            self.assertEqual(err.count("\n"), 1, err)
        self.assertEqual(self.snapshot(), before, "output written or changed")
        return out

    def train(self, *extra, out="out"):
        """`train` on x.csv/y.csv; options in `extra` replace the defaults."""
        args = {"--features": "x.csv", "--targets": "y.csv", "--epochs": "1", "--threads": "1",
                "--progress": "none", "--out": out}
        rest = []
        for i in range(0, len(extra), 2):
            if extra[i] in args:
                args[extra[i]] = extra[i + 1]
            else:
                rest += extra[i:i + 2]
        return ["train", *[v for item in args.items() for v in item], *rest]

    def trained(self):
        code, _, err = self.run_limited(self.train())
        self.assertEqual(code, 0, err)

    # ---- item 4: tiny inputs that used to reach out-of-memory --------------------------

    def test_dev_zero(self):
        self.assert_refused(["check-targets", "/dev/zero"],
                            "/dev/zero: not an IDX file (unknown element type 0x00)")
        self.assert_refused(["train", "--features", "/dev/zero", "--targets", "y.csv",
                             "--out", "out"],
                            "/dev/zero: not an IDX file (unknown element type 0x00)")

    def test_dev_urandom_is_not_swallowed(self):
        self.assert_refused(["check-targets", "/dev/urandom", "--targets-format", "index"],
                            "/dev/urandom:", exact=False)

    def test_gzip_bombs(self):
        # 256 MiB of zeros behind a header promising 10 labels: stopped at the header's size
        with open(self.path("y-idx1-ubyte.gz"), "wb") as f:
            f.write(gzip_bomb(idx_bytes(0x08, [10], b""), 256 << 20))
        self.assertLess(os.path.getsize(self.path("y-idx1-ubyte.gz")), 1 << 20)
        self.assert_refused(["check-targets", "y-idx1-ubyte.gz"],
                            "y-idx1-ubyte.gz: more data than its IDX header declares (18 bytes "
                            "in all)")
        with open(self.path("t.npy.gz"), "wb") as f:
            f.write(gzip_bomb(npy_bytes(None, (3, 2), data=b""), 256 << 20))
        self.assert_refused(["check-targets", "t.npy.gz"],
                            "t.npy.gz: more data than its NPY header declares (152 bytes in all)")
        # a header that itself promises more than an input may hold
        with open(self.path("big.npy.gz"), "wb") as f:
            f.write(gzip_bomb(npy_bytes(None, (10 ** 9,), data=b""), 4 << 20))
        self.assert_refused(["check-targets", "big.npy.gz"],
                            "big.npy.gz: the NPY header declares 4000000000 bytes of data (shape "
                            "(1000000000,)), more than the limit of 1073741824 bytes on an input "
                            "file")
        # zeros named CSV: binary data, seen in the first 2 MiB
        with open(self.path("t.csv.gz"), "wb") as f:
            f.write(gzip_bomb(b"0.5,0.5\n", 256 << 20))
        self.assert_refused(["check-targets", "t.csv.gz"],
                            "t.csv.gz:2: binary data in a CSV file")

    def test_millions_of_bad_rows_cost_a_counter(self):
        # 60 KB of gzip, 21 million bad labels: one message per row would need ~2 GB
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        data = b"".join([c.compress(b"-1\n" * (1 << 20)) for _ in range(20)]) + c.flush()
        with open(self.path("neg.csv.gz"), "wb") as f:
            f.write(data)
        out = self.assert_refused(["check-targets", "neg.csv.gz", "--max-report", "1"],
                                  "neg.csv.gz: 20971520 of 20971520 rows are not valid class "
                                  "indices", timeout=120)
        self.assertEqual(out, "neg.csv.gz:1: class index -1 is not a non-negative integer\n"
                              "... and 20971519 more\n")
        self.assert_refused(self.train("--targets", "neg.csv.gz"),
                            "neg.csv.gz: 20971520 rows, but x.csv has 12 (one row per feature "
                            "row is needed)", timeout=120)

    def test_one_endless_csv_line(self):
        with open(self.path("wide.csv.gz"), "wb") as f:
            f.write(self.gzip_text(b"," * (1 << 25)))
        self.assert_refused(["check-targets", "wide.csv.gz"],
                            "wide.csv.gz:1: more than 16777216 columns, the limit on a CSV line")

    def gzip_text(self, data):
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return c.compress(data) + c.flush()

    def test_huge_label_does_not_size_the_model(self):
        write_csv(self.path("t.csv"), [[0], [1], [2], [3000000000], [1], [0]] * 2)
        self.assert_refused(self.train("--targets", "t.csv"),
                            "t.csv:4: class index 3e+09 exceeds the limit of 16777215 (at most "
                            "16777216 classes)")

    def test_huge_model(self):
        self.assert_refused(self.train("--model", "mlp:65536,65536"),
                            "--model mlp:65536,65536: 4295557123 parameters for 4 inputs and 3 "
                            "classes, more than the limit of 134217728")

    def test_huge_npy_header_from_a_fifo(self):
        os.mkfifo(self.path("x.npy"))

        def feed():
            try:
                with open(self.path("x.npy"), "wb") as f:
                    f.write(npy_bytes(None, (1 << 40, 4), data=b""))
                    for _ in range(64):
                        f.write(bytes(1 << 16))
            except (BrokenPipeError, OSError):
                pass

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        self.assert_refused(["train", "--features", "x.npy", "--targets", "y.csv", "--out", "out"],
                            "x.npy: the NPY header declares 17592186044416 bytes of data (shape "
                            "(1099511627776, 4)), more than the limit of 1073741824 bytes on an "
                            "input file")
        writer.join(10)

    def test_hostile_model_files(self):
        predict = ["predict", "--features", "x.csv", "--out", "p.csv", "--model"]
        with open(self.path("deep.json"), "w") as f:
            f.write("[" * 100000 + "]" * 100000)
        self.assert_refused(predict + ["deep.json"],
                            "deep.json: not a valid softce model file (nested deeper than 16 "
                            "levels)")
        with open(self.path("wide.json"), "w") as f:
            f.write('{"format": "softce-model", "x": [' + "0," * 200000 + "0]}")
        self.assert_refused(predict + ["wide.json"],
                            "wide.json: not a valid softce model file (more than 100000 JSON "
                            "values)")
        with open(self.path("huge.json"), "w") as f:
            json.dump({"format": "softce-model", "version": 1, "inputs": 1 << 26, "classes": 10,
                       "hidden": [65536, 65536]}, f)
        self.assert_refused(predict + ["huge.json"],
                            "huge.json: not a valid softce model file (4402342264842 parameters, "
                            "more than the limit of 134217728)")

    def test_pipes_within_the_bounds_still_work(self):
        """The bounds on non-regular inputs do not stop legitimate pipes (<(zcat ...))."""
        with open(self.path("x.csv"), "rb") as f:
            features = f.read()
        y = npy_bytes(None, (12,), descr="<i8",
                      data=struct.pack("<12q", *[i % 3 for i in range(12)]))
        feeds = {"xf": features, "yf.npy": self.gzip_text(y)}
        threads = []
        for name, data in feeds.items():
            os.mkfifo(self.path(name))

            def feed(name=name, data=data):
                with open(self.path(name), "wb") as f:
                    f.write(data)

            threads.append(threading.Thread(target=feed, daemon=True))
            threads[-1].start()
        code, _, err = self.run_limited(self.train("--features", "xf", "--targets", "yf.npy"))
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.isfile(self.path("out/model.json")))
        for t in threads:
            t.join(10)

    # ---- item 5: labels beyond int64 / float32 integers --------------------------------

    def test_labels_beyond_the_integer_range(self):
        write_csv(self.path("t.csv"), [[0], [1], [9.3e18], [2]])
        out = self.assert_refused(["check-targets", "t.csv"],
                                  "t.csv: 1 of 4 rows are not valid class indices")
        self.assertEqual(out, "t.csv:3: class index 9.3e+18 exceeds the limit of 16777215 (at "
                              "most 16777216 classes)\n")
        write_npy(self.path("t.npy"), [0.0, 1.0, 2.0, 1e30], (4,), descr="<f8")
        out = self.assert_refused(["check-targets", "t.npy"],
                                  "t.npy: 1 of 4 rows are not valid class indices")
        self.assertEqual(out, "t.npy: record 3: class index 1e+30 exceeds the limit of 16777215 "
                              "(at most 16777216 classes)\n")
        write_npy(self.path("u.npy"), None, (3,), descr="<u8",
                  data=struct.pack("<3Q", 0, 2 ** 64 - 1, 1))
        write_csv(self.path("x3.csv"), [[1, 2, 3, 4]] * 3)
        self.assert_refused(["train", "--features", "x3.csv", "--targets", "u.npy", "--out", "o"],
                            "u.npy: record 1: class index 1.8446744e+19 exceeds the limit of "
                            "16777215 (at most 16777216 classes)")
        # top-k indices too
        write_csv(self.path("k.csv"), [[0, 1e30, 0.5, 0.5]])
        self.assert_refused(["check-targets", "k.csv", "--targets-format", "topk"],
                            "k.csv: 1 of 1 rows are not valid top-k probabilities")

    def test_topk_duplicate_check_is_fast(self):
        k = 20000
        row = list(range(k)) + [0.5 / k] * k
        row[k - 1] = 5  # duplicate of column 6
        write_csv(self.path("k.csv"), [row])
        start = time.monotonic()
        out = self.assert_refused(["check-targets", "k.csv", "--targets-format", "topk"],
                                  "k.csv: 1 of 1 rows are not valid top-k probabilities")
        self.assertEqual(out, "k.csv:1: duplicate class index 5 in columns 6 and 20000\n")
        self.assertLess(time.monotonic() - start, 5)

    # ---- item 7: option ranges ---------------------------------------------------------

    def test_option_ranges(self):
        cases = [
            (["--classes", "-5"], "--classes: must be an integer in [2, 16777216], not -5"),
            (["--seed", "-1"], "--seed: must be an integer in [0, 18446744073709551615], not -1"),
            (["--lr", "1e30"], "--lr: must be in (0, 10], not 1e30"),
            (["--lr", "nan"], "--lr: must be in (0, 10], not nan"),
            (["--lr", "0"], "--lr: must be in (0, 10], not 0"),
            (["--temperature", "1e300"], "--temperature: must be in (0, 1000], not 1e300"),
            (["--temperature", "-inf"], "--temperature: must be in (0, 1000], not -inf"),
            (["--alpha", "1.5"], "--alpha: must be in [0, 1], not 1.5"),
            (["--label-smoothing", "-0.1"], "--label-smoothing: must be in [0, 1], not -0.1"),
            (["--tolerance", "-1"], "--tolerance: must be in [0, 1], not -1"),
            (["--batch-size", "0"], "--batch-size: must be an integer in [1, 16777216], not 0"),
            (["--epochs", "1e9"], "--epochs: expected an integer in [1, 100000], not '1e9'"),
            (["--threads", "-1"], "--threads: must be an integer in [0, 1024], not -1"),
        ]
        for extra, message in cases:
            with self.subTest(option=extra[0], value=extra[1]):
                self.assert_refused(self.train(*extra), message)
        self.assert_refused(["check-targets", "y.csv", "--tolerance", "-1"],
                            "--tolerance: must be in [0, 1], not -1")
        self.assert_refused(["check-targets", "y.csv", "--max-report", "-3"],
                            "--max-report: must be an integer in [0, 9223372036854775807], not -3")
        self.assert_refused(["demo", "--seed", "-1", "--data", "nowhere"],
                            "--seed: must be an integer in [0, 18446744073709551615], not -1")

    # ---- item 1: numbers that overflow -------------------------------------------------

    def test_predict_on_overflowing_features(self):
        # a linear model with every weight 1: logits = sum of the features
        def array_json(values, shape):
            data = base64.b64encode(struct.pack("<%df" % len(values), *values)).decode()
            return {"dtype": "<f4", "shape": shape, "base64": data}

        model = {"format": "softce-model", "version": 1, "architecture": "linear", "inputs": 4,
                 "classes": 3, "hidden": [], "activation": "relu",
                 "standardize": {"mean": array_json([0] * 4, [4]),
                                 "scale": array_json([1] * 4, [4])},
                 "layers": [{"weight": array_json([1] * 12, [3, 4]),
                             "bias": array_json([0] * 3, [3])}]}
        with open(self.path("m.json"), "w") as f:
            json.dump(model, f)
        write_csv(self.path("big.csv"), [[1, 2, 3, 4], [3e38, 3e38, 0, 0]])
        self.assert_refused(["predict", "--model", "m.json", "--features", "big.csv", "--out",
                             "p.csv"],
                            "big.csv:2: the model's logits overflow float32 (inf or NaN) for this "
                            "row: its features are far outside the range the model was trained "
                            "on (nothing was written)")

    def test_validation_features_that_overflow(self):
        # training features spread over 1e-3: standardising 1e37 overflows float32
        x, _ = blobs(12, seed=2)
        write_csv(self.path("x.csv"), [[v * 1e-3 for v in row] for row in x])
        write_csv(self.path("vx.csv"), [[1e37] * 4, [1, 2, 3, 4]])
        write_csv(self.path("vy.csv"), [[0], [1]])
        self.assert_refused(self.train("--val-features", "vx.csv", "--val-targets", "vy.csv"),
                            "vx.csv:1: the model's logits overflow float32 (inf or NaN) for this "
                            "validation row after epoch 1: its features are far outside the range "
                            "of the training features (nothing was written)")

    # ---- item 3: --out never replaces anything but a regular file ----------------------

    def test_out_refuses_links_fifos_and_devices(self):
        self.trained()
        os.symlink("x.csv", self.path("link.csv"))
        os.mkfifo(self.path("fifo.csv"))
        predict = ["predict", "--model", "out", "--features", "x.csv", "--out"]
        self.assert_refused(predict + ["link.csv"],
                            "link.csv: is a symbolic link; softce only replaces regular files "
                            "(remove it or choose another --out)")
        self.assert_refused(predict + ["fifo.csv"],
                            "fifo.csv: is a FIFO; softce only replaces regular files (remove it "
                            "or choose another --out)")
        self.assert_refused(predict + ["/dev/null"],
                            "/dev/null: is a character device; softce only replaces regular "
                            "files (remove it or choose another --out)")
        self.assertTrue(os.path.exists("/dev/null") and not os.path.isfile("/dev/null"))
        # train: an output name taken by a symlink is refused before training
        os.replace(self.path("out/metrics.json"), self.path("metrics.keep"))
        os.symlink("../x.csv", self.path("out/metrics.json"))
        self.assert_refused(self.train(),
                            "out/metrics.json: is a symbolic link; softce only replaces regular "
                            "files (remove it or choose another --out)")

    # ---- item 2: all-or-nothing commit -------------------------------------------------

    def test_failed_commit_rolls_back(self):
        self.trained()
        self.assert_refused(self.train("--seed", "7"),
                            "out/metrics.json: cannot write: Input/output error (no output "
                            "written, earlier outputs unchanged)",
                            SOFTCE_TEST_FAIL_RENAME="metrics.json")
        self.assert_refused(self.train("--seed", "7"),
                            "out/model.json: cannot write: Input/output error (no output written, "
                            "earlier outputs unchanged)",
                            SOFTCE_TEST_FAIL_RENAME="model.json")
        # a fresh directory is removed again
        self.assert_refused(self.train(out="fresh/run"),
                            "fresh/run/metrics.json: cannot write: Input/output error (no output "
                            "written, earlier outputs unchanged)",
                            SOFTCE_TEST_FAIL_RENAME="metrics.json")

    # ---- item 6: signals ---------------------------------------------------------------

    def signalled(self, args, sig, status, message, wait_for=None):
        before = self.snapshot()
        p = self.start(args)
        time.sleep(0.5) if wait_for is None else wait_for(p)
        p.send_signal(sig)
        start = time.monotonic()
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            self.fail("signal %d ignored by softce %s" % (sig, " ".join(args)))
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(p.returncode, status, err)
        self.assertEqual(err, message + "\n")
        self.assertEqual(self.snapshot(), before, "output written or changed")

    def test_signal_while_blocked_opening_a_fifo(self):
        os.mkfifo(self.path("t.csv"))
        self.signalled(["check-targets", "t.csv"], signal.SIGINT, 130,
                       "softce: interrupted; no output written, earlier outputs unchanged")
        self.signalled(["check-targets", "t.csv"], signal.SIGTERM, 143,
                       "softce: terminated; no output written, earlier outputs unchanged")
        self.signalled(self.train("--targets", "t.csv", out="new/dir"), signal.SIGTERM, 143,
                       "softce: terminated; no output written, earlier outputs unchanged")

    def test_signal_while_reading_a_pipe(self):
        os.mkfifo(self.path("t.csv"))
        opened = threading.Event()
        done = threading.Event()

        def feed():
            with open(self.path("t.csv"), "w") as f:
                opened.set()
                f.write("0.5,0.5\n" * 1000)
                f.flush()
                done.wait(20)  # keep the pipe open: softce waits for more

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        try:
            self.signalled(["check-targets", "t.csv"], signal.SIGINT, 130,
                           "softce: interrupted; no output written, earlier outputs unchanged",
                           wait_for=lambda p: (opened.wait(10), time.sleep(0.3)))
        finally:
            done.set()
            writer.join(10)

    def test_signal_during_the_commit_is_deferred(self):
        """A signal between the renames waits for the last one: all outputs are new."""
        self.trained()
        old_model = self.snapshot()[self.path("out/model.json")]
        old_metrics = self.snapshot()[self.path("out/metrics.json")]
        p = self.start(self.train("--seed", "9"), SOFTCE_TEST_COMMIT_PAUSE="2")
        deadline = time.monotonic() + 60
        while self.snapshot()[self.path("out/model.json")] == old_model:  # first rename done
            self.assertLess(time.monotonic(), deadline, "the commit never started")
            self.assertIsNone(p.poll())
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 143, err)
        self.assertEqual(err, "softce: terminated after the outputs were written\n")
        after = self.snapshot()
        self.assertNotEqual(after[self.path("out/metrics.json")], old_metrics)
        self.assertEqual(sorted(os.listdir(self.path("out"))), ["metrics.json", "model.json"])

    def test_sigterm_during_training_keeps_earlier_outputs(self):
        self.trained()
        rng = __import__("random").Random(5)
        n, d = 4000, 64
        write_npy(self.path("bx.npy"), None, (n, d),
                  data=array.array("f", [rng.random() for _ in range(n * d)]).tobytes())
        write_npy(self.path("by.npy"), None, (n,),
                  data=array.array("q", [rng.randrange(4) for _ in range(n)]).tobytes(),
                  descr="<i8")

        def first_epoch(p):
            line = p.stderr.readline()
            self.assertIn("epoch 1/1000", line)

        args = ["train", "--features", "bx.npy", "--targets", "by.npy", "--model", "mlp:256,256",
                "--epochs", "1000", "--threads", "1", "--progress", "lines", "--out", "out"]
        before = self.snapshot()
        p = self.start(args)
        first_epoch(p)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        self.assertEqual(p.returncode, 143, err)
        self.assertTrue(err.endswith(
            "softce: terminated; no output written, earlier outputs unchanged\n"), err)
        self.assertEqual(self.snapshot(), before)


if __name__ == "__main__":
    unittest.main()
