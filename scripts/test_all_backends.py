#!/usr/bin/env python
"""Runs the whole pytest suite once per Keras backend; fails if any fails.

    python scripts/test_all_backends.py [--backends tensorflow,jax,torch] [--workers N] [pytest args]

Each backend runs in its own pytest session (`KERAS_BACKEND` is read once, at
import), one backend after the other, with `--workers` pytest-xdist worker
processes (default: the number of cores, at most 4). Much of a test's time is
single-threaded tracing and XLA compilation, so two workers on two cores
nearly halve the wall time; `--workers 0` runs in one process.
The script ends with a summary line `N passed, N failed, N skipped`.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")


def counts(junit_path):
    """(passed, failed, skipped) from a JUnit XML report."""
    try:
        root = ET.parse(junit_path).getroot()
    except (OSError, ET.ParseError):
        return 0, 0, 0
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total - failed - skipped, failed, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 4),
                        help="pytest-xdist workers per backend (0: no xdist)")
    args, pytest_args = parser.parse_known_args()
    backends = [b for b in args.backends.split(",") if b]
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}; choose from {BACKENDS}")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            junit = os.path.join(tmp, f"{backend}.xml")
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
            # JAX's persistent compilation cache, fresh for each run and shared
            # by the workers: a program compiled twice (the same step of a
            # model and of its reloaded copy, or the same one in both
            # workers) is compiled once. Keyed on the program, so it cannot
            # change a result.
            env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tmp, "jax_cache"))
            env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
            command = [sys.executable, "-m", "pytest", "tests", "-q", "--durations=10",
                       "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args]
            if args.workers > 0:
                # worksteal: a worker that runs out of tests takes queued
                # ones from the other instead of waiting for it.
                command[4:4] = ["-n", str(args.workers), "--dist", "worksteal"]
            print(f"\n===== KERAS_BACKEND={backend}: {' '.join(command[1:])}", flush=True)
            start = time.time()
            code = subprocess.call(command, cwd=ROOT, env=env)
            passed, failed, skipped = counts(junit)
            # pytest exits 5 when it collected no test: that is a failure too.
            ok = code == 0 and passed > 0
            results.append((backend, ok, code, passed, failed, skipped, time.time() - start))

    print("\n===== summary")
    for backend, ok, code, passed, failed, skipped, seconds in results:
        status = "ok" if ok else f"FAILED (pytest exit code {code})"
        print(f"{backend:>10}: {passed} passed, {failed} failed, {skipped} skipped "
              f"in {seconds:.0f} s  {status}")
    total = [sum(r[i] for r in results) for i in (3, 4, 5)]
    print(f"{total[0]} passed, {total[1]} failed, {total[2]} skipped")
    return 0 if results and all(r[1] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
