"""Crash-safe output sets.

A run writes everything under `P.incomplete/` and, once all of it is written, moves the files
into place with `os.replace`, `P.stats.json` last. `P.stats.json` is the completion marker: it
records the run's inputs and settings and every output file with its size. So a killed run
never leaves a dataset that looks finished, and a rerun of a finished run can see that there
is nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil

from .errors import DataPrepError


class OutputSet:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.directory = os.path.dirname(os.path.abspath(prefix))
        self.staging = prefix + ".incomplete"
        self.stats_path = prefix + ".stats.json"

    def staged(self, name: str) -> str:
        """Where to write the output file `name` (a name in the prefix's directory) for now."""
        return os.path.join(self.staging, name)

    def finished_run(self, run: dict, force: bool) -> dict | None:
        """The stats of a finished identical run, or None once the way is clear for a new one.

        Outputs of the same run that were damaged since are rebuilt; without `force`, outputs
        of a different run or of unknown origin are never replaced.
        """
        stats = self._read_stats()
        if stats is not None and stats.get("run") == run:
            if self._files_intact(stats) and not force:
                return stats
        elif not force:
            if stats is not None:
                previous = stats.get("run", {})
                changed = sorted(k for k in run.keys() | previous.keys() if run.get(k) != previous.get(k))
                raise DataPrepError(
                    f"{self.stats_path} records a run with other inputs or settings "
                    f"(changed: {', '.join(changed)}); pass --force to replace its outputs, "
                    "or choose another --output-prefix"
                )
            for suffix in (".bin", ".idx", ".blend.json"):
                if os.path.exists(self.prefix + suffix):
                    raise DataPrepError(
                        f"{self.prefix + suffix} exists but no {self.stats_path} says a data_prep "
                        "run finished it; pass --force to replace it, or choose another --output-prefix"
                    )
        self._clear(stats)
        return None

    def stage_json(self, name: str, content: dict) -> str:
        with open(self.staged(name), "w") as file:
            json.dump(content, file, indent=2)
            file.write("\n")
        return name

    def commit(self, names: list[str], stats: dict) -> dict:
        """Move the staged files into place in order, then the stats file (the marker)."""
        stats["files"] = {name: os.path.getsize(self.staged(name)) for name in names}
        for name in names:
            os.replace(self.staged(name), os.path.join(self.directory, name))
        stats_name = self.stage_json(os.path.basename(self.stats_path), stats)
        os.replace(self.staged(stats_name), self.stats_path)
        os.rmdir(self.staging)
        return stats

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _read_stats(self) -> dict | None:
        try:
            with open(self.stats_path) as file:
                stats = json.load(file)
        except (OSError, ValueError):
            return None
        return stats if isinstance(stats, dict) else None

    def _files_intact(self, stats: dict) -> bool:
        return all(
            os.path.exists(path := os.path.join(self.directory, name)) and os.path.getsize(path) == size
            for name, size in stats.get("files", {}).items()
        )

    def _clear(self, stats: dict | None) -> None:
        """Remove the marker first, so that a run killed from here on leaves nothing finished."""
        if os.path.exists(self.stats_path):
            os.remove(self.stats_path)
        names = list((stats or {}).get("files", {}))
        base = os.path.basename(self.prefix)
        names += [base + suffix for suffix in (".bin", ".idx", ".blend.json")]
        for name in names:
            path = os.path.join(self.directory, os.path.basename(name))
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)
