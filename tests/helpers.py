"""Helpers shared by the tests (fixtures stay in conftest.py)."""

import os
from typing import Dict


class CountingFileSystem:
    """An fsspec filesystem that counts what is read through it: wraps another one and appends
    "open <path>" and "read <path> <bytes>" lines to `log` (a local file, so that Ray's worker
    processes can count too). Pass it to the jobs as `storage_options={"filesystem": fs}`; ship
    this module to the workers with `ray.cloudpickle.register_pickle_by_value`."""

    def __init__(self, inner, log: str) -> None:
        self.inner, self.log = inner, log

    def __getattr__(self, name):
        if name in ("inner", "log") or name.startswith("__"):  # unpickling: not set yet
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _note(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def open(self, path, mode="rb", **kwargs):
        f = self.inner.open(path, mode, **kwargs)
        if "r" not in mode:
            return f
        self._note(f"open {path}")
        return _CountingFile(f, lambda n: self._note(f"read {path} {n}"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = self.inner.cat_file(path, start=start, end=end, **kwargs)
        self._note(f"open {path}")
        self._note(f"read {path} {len(data)}")
        return data


class _CountingFile:
    def __init__(self, f, report) -> None:
        self.f, self.report, self.count = f, report, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.count += len(data)
        return data

    def close(self):
        self.report(self.count)
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        if name == "f" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.f, name)


def read_counts(log: str, suffix: str) -> Dict[str, int]:
    """{"opens": n, "bytes": n} of the paths ending in `suffix`, from a CountingFileSystem log."""
    counts = {"opens": 0, "bytes": 0}
    if not os.path.exists(log):
        return counts
    with open(log) as f:
        for line in f:
            kind, path, *rest = line.split()
            if path.endswith(suffix):
                counts["opens" if kind == "open" else "bytes"] += 1 if kind == "open" else int(rest[0])
    return counts


class DyingEncoder:
    """A stand-in for the model actor that dies (os._exit, as the OOM killer would end it) on any
    batch holding an image named "poison", and gives zero embeddings otherwise."""

    def __init__(self, cpu_threads=None, **_) -> None:
        pass

    def __call__(self, batch):
        import numpy as np

        if any("poison" in str(s) for s in batch["source"]):
            os._exit(1)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = np.zeros((len(batch["image_id"]), 256, 64, 64), np.float16)
        return out


class KillWorkerAt:
    """A distillation `on_step` callback for failure drills: the training worker of `rank` SIGKILLs
    itself once, right after the report of step `step` (the marker file keeps the restart alive)."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
