"""What the reproductions in experiments/ share: comma-separated integer flags, means with their standard errors,
a log that is printed and kept, and the published claims printed PASS or FAIL as measured."""

import contextlib
from pathlib import Path

from nanoalign.evaluate import standard_error


def int_list(cfg, name: str) -> list[int]:
    """The flag `name` of cfg, increasing comma-separated positive integers ("250,500,1000"), or one clear error
    naming it."""
    value = getattr(cfg, name)
    try:
        out = [int(x) for x in value.split(",")]
    except ValueError:
        out = []
    if not out or min(out) <= 0 or sorted(set(out)) != out:
        raise SystemExit(f"--{name}={value}: expected increasing comma-separated positive integers")
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of xs: one number ± its s.e. over seeds."""
    return sum(xs) / len(xs), standard_error(xs)


@contextlib.contextmanager
def logged(path):
    """-> log(line): prints the line and appends it to the file at path (written as it goes)."""
    with open(Path(path), "w") as f:
        def log(line: str) -> None:
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()
        yield log


def print_claims(claims: list[dict]) -> None:
    """Each claim {"claim", "pass", "measured"} on one line: PASS or FAIL, the claim, what was measured."""
    for c in claims:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['claim']}: {c['measured']}")
