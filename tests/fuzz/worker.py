"""The fuzzer's child process: its address space capped, it runs mutants and reports one JSON line each.

Input (stdin, JSON): ``fixtures``, ``workdir``, ``memory`` (bytes allowed beyond the start-up size), ``heavy``,
and either ``replay`` (a list of ``[seed, steps]``) or ``seed`` + ``seconds`` (random mutants until then).
Output (stdout, JSON lines): ``start`` before each mutant (so the parent knows which one hung), ``done`` after
it with its problems, ``end`` with counts.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .damage import Step, random_steps
from .harness import block_paths, examine
from .locate import Wrapped, unwrap
from .seeds import Seed, load_seeds


def cap_memory(extra: int) -> None:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Session:
    def __init__(self, job: dict[str, Any]) -> None:
        self.seeds = load_seeds(Path(job["fixtures"]), heavy=bool(job.get("heavy")))
        self.folder = Path(job["workdir"])
        self.structure: dict[str, dict[str, Wrapped | None]] = {}
        self.baselines: dict[str, dict[str, str]] = {}
        self.stats: Counter[str] = Counter()

    def baseline(self, seed: Seed) -> dict[str, str]:
        """Digests of what the unmutated seed's commands write; it must pass every invariant itself."""
        if seed.name not in self.baselines:
            examined = examine(seed, [], self.folder)
            if examined.problems:
                emit(event="baseline", seed=seed.name, problems=examined.problems)
            first = next(iter(examined.outcomes.values()))
            self.baselines[seed.name] = {r.command: r.digest for r in first if r.digest}
        return self.baselines[seed.name]

    def run(self, number: int, seed: Seed, steps: list[Step]) -> None:
        emit(event="start", id=number, entry=[seed.name, steps])
        began = time.monotonic()
        examined = examine(seed, steps, self.folder, self.baseline(seed))
        first = next(iter(examined.outcomes.values()))
        for r in first:
            verdict = r.error or ("traceback" if r.crash else "corrupt" if r.rc == 2 else "ok")
            self.stats[f"{r.command}: {verdict}"] += 1
        for op, _name, _args in steps:
            self.stats[f"step {op}"] += 1
        emit(event="done", id=number, problems=examined.problems, seconds=round(time.monotonic() - began, 3))


def main() -> None:
    job = json.loads(sys.stdin.read())
    logging.disable(logging.CRITICAL)  # torn-write warnings and the like: outcomes are judged, not logs
    cap_memory(int(job["memory"]))
    session = Session(job)
    emit(event="paths", paths=[label for label, _ in block_paths()], seeds=sorted(session.seeds))
    count = 0
    if "replay" in job:
        for seed_name, steps in job["replay"]:
            if seed_name in session.seeds:
                session.run(count, session.seeds[seed_name], [tuple(s) for s in steps])
                count += 1
    else:
        rng = random.Random(job["seed"])
        seeds = sorted(session.seeds.values(), key=lambda s: s.name)
        deadline = time.monotonic() + float(job["seconds"])
        while time.monotonic() < deadline:
            seed = rng.choices(seeds, weights=[s.weight for s in seeds])[0]
            structure = session.structure.setdefault(seed.name, {n: unwrap(b) for n, b in seed.files})
            session.run(count, seed, random_steps(seed, rng, structure))
            count += 1
    emit(event="end", count=count, stats=dict(session.stats))


if __name__ == "__main__":
    main()
