"""What the reproductions in experiments/ share: the --quick smoke run, comma-separated integer flags, means with
their standard errors, a log that is printed and kept, and the end of a run: results.json, the tables and the
published claims printed PASS or FAIL as measured."""

import contextlib
from dataclasses import replace
from pathlib import Path

from nanoalign.evaluate import standard_error, write_json


def quick(cfg, values: dict):
    """cfg, or with --quick=True cfg with `values` in the fields they name: a smoke run in seconds, whose numbers
    mean nothing."""
    if not cfg.quick:
        return cfg
    print(f"--quick=True: {values}")
    return replace(cfg, **values)


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


def write_results(out, result: dict, tables: str, claims: list[dict], seeds: int) -> dict:
    """The end of a reproduction: result written to out/results.json, then its tables, each claim PASS or FAIL,
    and the time it took (result["time_s"])."""
    write_json(Path(out) / "results.json", result)
    print(f"\n{tables}\n")
    print_claims(claims)
    print(f"\n{seeds} seeds in {result['time_s'] / 60:.1f} min; {Path(out) / 'results.json'}")
    return result
