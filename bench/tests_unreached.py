"""The test ids of a collection that a pytest -v log never reported (bench/gpu_tests.sh, after a
run cut by its time limit): prints them, one a line, in the collection's order.

Usage: python3 bench/tests_unreached.py COLLECTED LOG
  COLLECTED  ``pytest --collect-only -q`` output (the lines with "::" are the ids)
  LOG        the -v run's output: "[gwN] [ p%] RESULT id" lines under pytest-xdist,
             "id RESULT [ p%]" without (ids may hold spaces and brackets)
"""

import re
import sys

RESULT = r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
XDIST = re.compile(rf"\] {RESULT} (tests/.*?)\s*$")
PLAIN = re.compile(rf"^(tests/\S.*?) {RESULT}(\s|$)")


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


def main(collected: str, log: str) -> int:
    with open(collected, errors="replace") as f:
        ids = [line.rstrip("\n") for line in f if "::" in line]
    with open(log, errors="replace") as f:
        seen = reported(f)
    print(*(i for i in ids if i not in seen), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
