"""What bench/gpu_tests.sh reads from pytest's output, one command each:

  python3 bench/pytest_log.py unreached COLLECTED LOG
      the ids of COLLECTED (``pytest --collect-only -q`` output: its lines with "::") that the
      -v run's output LOG never reported, one a line, in collection order (after a run cut by
      its time limit). LOG lines: "[gwN] [ p%] RESULT id" under pytest-xdist, "id RESULT
      [ p%]" without (ids may hold spaces and brackets).
  python3 bench/pytest_log.py slowest-first LOG
      the test files under tests/, the slowest first by LOG's per-test times (its
      ``--durations`` lines: setup, call and teardown summed per file), the rest in order.
"""

import collections
import pathlib
import re
import sys

RESULT = r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
XDIST = re.compile(rf"\] {RESULT} (tests/.*?)\s*$")
PLAIN = re.compile(rf"^(tests/\S.*?) {RESULT}(\s|$)")
DURATION = re.compile(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(tests/\S+?\.py)::")


def reported(lines) -> set[str]:
    out = set()
    for line in lines:
        m = XDIST.search(line)
        if m:
            out.add(m.group(2))
            continue
        m = PLAIN.match(line)
        if m:
            out.add(m.group(1))
    return out


def unreached(collected: str, log: str) -> list[str]:
    with open(collected, errors="replace") as f:
        ids = [line.rstrip("\n") for line in f if "::" in line]
    with open(log, errors="replace") as f:
        seen = reported(f)
    return [i for i in ids if i not in seen]


def slowest_first(log: str) -> list[str]:
    weight = collections.Counter()
    path = pathlib.Path(log)
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = DURATION.match(line)
        if m:
            weight[m.group(2)] += float(m.group(1))
    files = sorted(str(p) for p in pathlib.Path("tests").rglob("test_*.py"))
    return sorted(files, key=lambda f: -weight[f])  # (stable: the rest in order)


def main(argv: list[str]) -> int:
    commands = {"unreached": (unreached, 2), "slowest-first": (slowest_first, 1)}
    if not argv or argv[0] not in commands or len(argv) != commands[argv[0]][1] + 1:
        print(__doc__, file=sys.stderr)
        return 2
    fn, _ = commands[argv[0]]
    print(*fn(*argv[1:]), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
