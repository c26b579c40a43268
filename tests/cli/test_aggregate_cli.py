#!/usr/bin/env python3
"""End-to-end tests of `softce aggregate` (Python standard library only).

    SOFTCE=build/tools/softce python3 tests/cli/test_aggregate_cli.py -v

Outputs are checked against a naive float64 Dawid-Skene written here, against the exact vote
fractions and majority vote, and against `softce train --targets` (which must read them as they
are). Every bad input is checked for exit code 2, its exact one-line message naming the file and
line (or record), and an output directory left exactly as it was.
"""
import array
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import unittest

SOFTCE = os.environ.get("SOFTCE", "softce")
if os.sep in SOFTCE:
    SOFTCE = os.path.abspath(SOFTCE)


def run(*args, cwd=None):
    return subprocess.run([SOFTCE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def write_csv(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(",".join(str(v) for v in row) + "\n")


def write_npy(path, rows, descr="<f4"):
    n, m = len(rows), len(rows[0])
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (descr, n, m)
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    code = {"<f4": "f", "<i8": "q"}[descr]
    data = array.array(code, [v for row in rows for v in row]).tobytes()
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data)


def read_csv(path):
    with open(path) as f:
        return [[float(v) for v in line.split(",")] for line in f]


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_npy(path):
    with open(path, "rb") as f:
        data = f.read()
    header_len = struct.unpack("<H", data[8:10])[0]
    header = data[10:10 + header_len].decode()
    assert "'<f4'" in header, header
    shape = tuple(int(s) for s in header.split("(")[1].split(")")[0].split(",") if s.strip())
    values = array.array("f")
    values.frombytes(data[10 + header_len:])
    return [list(values[r * shape[1]:(r + 1) * shape[1]]) for r in range(shape[0])]


def simulate(items, annotators, classes, seed, abstain=0.25):
    """Wide votes (-1 = no vote): annotator j right with probability acc[j], else a
    neighbouring class; every item keeps at least one vote."""
    rng = random.Random(seed)
    acc = [0.5 + 0.45 * rng.random() for _ in range(annotators)]
    truth, rows = [], []
    for i in range(items):
        k = rng.randrange(classes)
        truth.append(k)
        row = []
        for j in range(annotators):
            if rng.random() < abstain:
                row.append(-1)
            elif rng.random() < acc[j]:
                row.append(k)
            else:
                row.append((k + rng.choice([1, classes - 1])) % classes)
        if all(v < 0 for v in row):
            row[i % annotators] = k
        rows.append(row)
    return rows, truth


def naive_dawid_skene(rows, classes, iterations, floor=1e-10):
    """Dawid-Skene EM in float64: vote-fraction start, M-step, then E/M alternately."""
    n, a, c = len(rows), len(rows[0]), classes
    post = []
    for row in rows:
        votes = [v for v in row if v >= 0]
        post.append([votes.count(k) / len(votes) for k in range(c)])

    def m_step():
        prior = [sum(p[k] for p in post) / n for k in range(c)]
        conf = []
        for j in range(a):
            used = {row[j] for row in rows if row[j] >= 0}
            cj = []
            for k in range(c):
                count = [0.0] * c
                for i, row in enumerate(rows):
                    if row[j] >= 0:
                        count[row[j]] += post[i][k]
                count = [max(x, floor) if l in used else x for l, x in enumerate(count)]
                total = sum(count)
                cj.append([x / total if total > 0 else 1.0 / c for x in count])
            conf.append(cj)
        return prior, conf

    prior, conf = m_step()
    for _ in range(iterations):
        for i, row in enumerate(rows):
            lp = []
            for k in range(c):
                s = math.log(max(prior[k], floor))
                for j, v in enumerate(row):
                    if v >= 0:
                        s += math.log(conf[j][k][v])
                lp.append(s)
            m = max(lp)
            e = [math.exp(x - m) for x in lp]
            total = sum(e)
            post[i] = [x / total for x in e]
        prior, conf = m_step()
    return post, prior, conf


class Aggregate(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.d = self.dir.name

    def tearDown(self):
        self.dir.cleanup()

    def path(self, name):
        return os.path.join(self.d, name)

    def test_dawid_skene_matches_naive_and_trains(self):
        rows, truth = simulate(150, 5, 3, seed=1)
        write_csv(self.path("votes.csv"), rows)
        r = run("aggregate", "--votes", self.path("votes.csv"), "--method", "dawid-skene",
                "--max-iterations", "12", "--tolerance", "0", "--out", self.path("probs.npy"))
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = [l for l in r.stderr.splitlines() if l.startswith("dawid-skene iteration")]
        self.assertEqual(len(lines), 12)
        self.assertTrue(lines[0].startswith("dawid-skene iteration 1/12  log-likelihood/item -"))
        probs = read_npy(self.path("probs.npy"))
        post, prior, conf = naive_dawid_skene(rows, 3, 12)
        self.assertEqual(len(probs), 150)
        worst = max(abs(p - q) for pr, qr in zip(probs, post) for p, q in zip(pr, qr))
        self.assertLess(worst, 1e-6)
        report = load_json(self.path("probs.json"))
        self.assertEqual((report["items"], report["annotators"], report["classes"]), (150, 5, 3))
        self.assertEqual(report["method"], "dawid-skene")
        self.assertEqual(report["dawid_skene"]["iterations"], 12)
        self.assertFalse(report["dawid_skene"]["converged"])
        for p, q in zip(report["dawid_skene"]["priors"], prior):
            self.assertAlmostEqual(p, q, places=12)
        for j, est in enumerate(report["annotator_estimates"]):
            self.assertEqual(est["votes"], sum(1 for row in rows if row[j] >= 0))
            for k in range(3):
                for l in range(3):
                    self.assertAlmostEqual(est["confusion"][k][l], conf[j][k][l], places=12)
            self.assertAlmostEqual(est["accuracy"],
                                   sum(prior[k] * conf[j][k][k] for k in range(3)), places=12)
        # the output is a valid target file for train, as it is
        x = [[float(t == d) * 2 + random.Random(i * 7 + d).gauss(0, 1) for d in range(3)]
             for i, t in enumerate(truth)]
        write_csv(self.path("x.csv"), x)
        t = run("train", "--features", self.path("x.csv"), "--targets", self.path("probs.npy"),
                "--epochs", "2", "--progress", "none", "--out", self.path("model"))
        self.assertEqual(t.returncode, 0, t.stderr)
        metrics = load_json(self.path("model/metrics.json"))
        self.assertEqual(metrics["targets"], "probabilities")
        self.assertEqual(metrics["classes"], 3)
        c = run("check-targets", self.path("probs.npy"))
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)

    def test_fractions_majority_and_long_format(self):
        rows = [[2, 1, -1], [0, 2, 2], [3, -1, -1], [3, 1, 0], [1, 1, 1]]
        write_csv(self.path("votes.csv"), rows)
        r = run("aggregate", "--votes", self.path("votes.csv"), "--method", "vote-fractions",
                "--out", self.path("f.csv"))
        self.assertEqual(r.returncode, 0, r.stderr)
        got = read_csv(self.path("f.csv"))
        for row, g in zip(rows, got):
            votes = [v for v in row if v >= 0]
            want = [votes.count(k) / len(votes) for k in range(4)]
            for p, q in zip(g, want):
                self.assertAlmostEqual(p, q, places=7)
        r = run("aggregate", "--votes", self.path("votes.csv"), "--method", "majority",
                "--out", self.path("m.npy"))
        self.assertEqual(r.returncode, 0, r.stderr)
        m = read_npy(self.path("m.npy"))
        # ties go to the lowest class id: (2, 1) -> 1, (3, 1, 0) -> 0
        self.assertEqual([row.index(1.0) for row in m], [1, 2, 3, 0, 1])
        self.assertEqual([sum(row) for row in m], [1.0] * 5)
        # the same votes in the long layout (shuffled rows) give the same outputs
        long_rows = [(i, j, v) for i, row in enumerate(rows) for j, v in enumerate(row) if v >= 0]
        random.Random(3).shuffle(long_rows)
        write_npy(self.path("long.npy"), long_rows, "<i8")
        for method in ("vote-fractions", "majority", "dawid-skene"):
            a = run("aggregate", "--votes", self.path("votes.csv"), "--method", method,
                    "--progress", "none", "--out", self.path("w.csv"))
            b = run("aggregate", "--votes", self.path("long.npy"), "--votes-format", "long",
                    "--method", method, "--progress", "none", "--out", self.path("l.csv"))
            self.assertEqual((a.returncode, b.returncode), (0, 0), a.stderr + b.stderr)
            self.assertEqual(a.stderr + b.stderr, "")
            wa = read_csv(self.path("w.csv"))
            wb = read_csv(self.path("l.csv"))
            for ra, rb in zip(wa, wb):
                for p, q in zip(ra, rb):
                    self.assertAlmostEqual(p, q, places=6, msg=method)

    def expect_bad(self, args, message, files=None):
        """exit 2, exactly `softce: error: MESSAGE`, and the directory unchanged."""
        out = self.path("out")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "probs.npy"), "wb") as f:
            f.write(b"earlier output")
        before = sorted(os.listdir(out))
        r = run("aggregate", *args, "--out", os.path.join(out, "probs.npy"), cwd=self.d)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(r.stderr, "softce: error: " + message + "\n")
        self.assertEqual(sorted(os.listdir(out)), before)
        with open(os.path.join(out, "probs.npy"), "rb") as f:
            self.assertEqual(f.read(), b"earlier output")

    def test_bad_input(self):
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir(self.d)
        write_csv("v.csv", [[0, 1, 2], [1, 3, 0], [2, 2, 2]])
        self.expect_bad(["--votes", "v.csv", "--classes", "3"],
                        "v.csv:2: vote 3 in column 2 is out of range for 3 classes")
        write_csv("neg.csv", [[0, -2], [1, 1]])
        self.expect_bad(["--votes", "neg.csv"],
                        "neg.csv:1: vote -2 in column 2 is not a non-negative integer "
                        "(class ids are 0, 1, ...; -1 is no vote)")
        write_csv("frac.csv", [[0, 1], [1.5, 1]])
        self.expect_bad(["--votes", "frac.csv"],
                        "frac.csv:2: vote 1.5 in column 1 is not a non-negative integer")
        write_csv("none.csv", [[0, 1], [1, 1], [-1, -1]])
        self.expect_bad(["--votes", "none.csv"],
                        "none.csv:3: no votes in this row (every item needs at least one vote; "
                        "-1 is no vote)")
        open("empty.csv", "w").close()
        self.expect_bad(["--votes", "empty.csv"], "empty.csv: file is empty")
        with open("ragged.csv", "w") as f:
            f.write("0,1,2\n1,1,1\n2,2\n")
        self.expect_bad(["--votes", "ragged.csv"], "ragged.csv:3: expected 3 values, found 2")
        write_csv("zeros.csv", [[0, 0], [0, -1]])
        self.expect_bad(["--votes", "zeros.csv"],
                        "zeros.csv: every vote is class 0, so the number of classes cannot be "
                        "inferred; pass --classes (at least 2)")
        write_npy("v.npy", [[0, 1], [1, 1], [7, 0]])
        self.expect_bad(["--votes", "v.npy", "--classes", "3"],
                        "v.npy: record 2: vote 7 in column 1 is out of range for 3 classes")
        # long layout
        write_csv("l.csv", [[0, 0, 1], [1, 3000000000, 0]])
        self.expect_bad(["--votes", "l.csv", "--votes-format", "long"],
                        "l.csv:2: annotator id 3e+09 in column 2 exceeds the limit of 16777215")
        write_csv("gap.csv", [[0, 0, 1], [2, 1, 0]])
        self.expect_bad(["--votes", "gap.csv", "--votes-format", "long"],
                        "gap.csv: item 1 has no votes (items are numbered 0 ... 2 by the largest "
                        "item id; every item needs at least one vote)")
        write_csv("two.csv", [[0, 1], [1, 0]])
        self.expect_bad(["--votes", "two.csv", "--votes-format", "long"],
                        "two.csv: long votes need 3 columns (item, annotator, label), the file "
                        "has 2")
        write_csv("big.csv", [[0, 0, 1], [1, 40, 0]])
        self.expect_bad(["--votes", "big.csv", "--votes-format", "long", "--classes", "1000"],
                        "big.csv: 41 annotators x 1000^2 classes of confusion matrices exceed "
                        "the limit of 33554432 values")
        write_csv("wide.csv", [[0, 1]] * 5)
        self.expect_bad(["--votes", "wide.csv", "--classes", "16777216"],
                        "wide.csv: 5 items x 16777216 classes exceed the limit of 33554432 "
                        "values")
        self.expect_bad(["--votes", "missing.csv"], "missing.csv: no such file")
        self.expect_bad(["--votes", "v.csv", "--method", "em"],
                        "--method must be dawid-skene, vote-fractions or majority, not 'em'")
        self.expect_bad(["--votes", "v.csv", "--smoothing", "nan"],
                        "--smoothing: must be in [0, 1e+06], not nan")

    def test_out_names(self):
        write_csv(self.path("v.csv"), [[0, 1], [1, 1]])
        r = run("aggregate", "--votes", self.path("v.csv"), "--out", self.path("p.json"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("--out must not end in .json", r.stderr)
        self.assertFalse(os.path.exists(self.path("p.json")))
        os.symlink("elsewhere", self.path("p.json"))
        r = run("aggregate", "--votes", self.path("v.csv"), "--out", self.path("p.npy"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("p.json: is a symbolic link", r.stderr)
        self.assertFalse(os.path.exists(self.path("p.npy")))


if __name__ == "__main__":
    unittest.main()
