"""Crash-safe, resumable output sets.

A run writes everything under `P.incomplete/`: each input file it finishes as a part of its
own, then the final files, which it moves into place with `os.replace`, `P.stats.json` last.
`P.stats.json` is the completion marker: it records the run's inputs and settings, every
output file with its size and every input file's documents. So a killed run never leaves a
dataset that looks finished, its rerun redoes only the files not finished, and a rerun of a
finished run can see what is left to do (nothing, or the files added or changed since).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

from .errors import DataPrepError
from .files import write_text_atomically


class OutputSet:
    def __init__(self, prefix: str, companions: tuple[str, ...] = ()):
        """`companions`: other prefixes in the same directory whose files this run writes too
        (the validation side of a split); P.stats.json is the marker of them all."""
        self.prefix = prefix
        self.companions = companions
        self.directory = os.path.dirname(os.path.abspath(prefix))
        self.staging = prefix + ".incomplete"
        self.stats_path = prefix + ".stats.json"

    def staged(self, name: str) -> str:
        """Where to write the output file `name` (a name in the prefix's directory) for now."""
        return os.path.join(self.staging, name)

    def previous_run(self, run: dict, force: bool, settings: tuple[str, ...]) -> dict | None:
        """The stats of the finished run here, if this run may keep its outputs or reuse its
        unchanged files (same `settings`, files intact); else None, once the way is clear.

        Damaged outputs are rebuilt; without `force`, outputs of other settings or of
        unknown origin are never replaced.
        """
        stats = None if force else self._read_stats()
        if stats is not None:
            previous = stats.get("run", {})
            changed = sorted(key for key in settings if run.get(key) != previous.get(key))
            if changed:
                raise DataPrepError(
                    f"{self.stats_path} records a run with other settings (changed: {', '.join(changed)}); "
                    "pass --force to replace its outputs, or choose another --output-prefix"
                )
            if self._files_intact(stats):
                return stats
        elif not force:
            for path in self._own_paths():
                if os.path.exists(path):
                    raise DataPrepError(
                        f"{path} exists but no {self.stats_path} says a data_prep "
                        "run finished it; pass --force to replace it, or choose another --output-prefix"
                    )
        self._clear(self._read_stats(), keep_parts=not force)
        return None

    def finished_stats(self) -> dict | None:
        """The stats of the finished run here, if its files are intact."""
        stats = self._read_stats()
        return stats if stats is not None and self._files_intact(stats) else None

    def parts(self, settings: dict) -> FileParts:
        """Where this run keeps each input file it has finished, until the commit."""
        for name in os.listdir(self.staging) if os.path.isdir(self.staging) else []:
            if name != FileParts.NAME:  # staged by an assembly that was cut short
                os.remove(os.path.join(self.staging, name))
        return FileParts(os.path.join(self.staging, FileParts.NAME), settings)

    def stage_json(self, name: str, content: dict) -> str:
        with open(self.staged(name), "w") as file:
            json.dump(content, file, indent=2)
            file.write("\n")
        return name

    def commit(self, names: list[str], stats: dict) -> dict:
        """Move the staged files into place in order, then the stats file (the marker).

        The old marker goes first: a kill during the renames leaves no finished run (its
        files are then tokenized again by the rerun, the parts of this run are still there).
        """
        stats["files"] = {name: os.path.getsize(self.staged(name)) for name in names}
        previous = self._read_stats()
        if os.path.exists(self.stats_path):
            os.remove(self.stats_path)
        for name in set((previous or {}).get("files", {})) - set(names):  # e.g. a domain no longer there
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.directory, os.path.basename(name)))
        for name in names:
            os.replace(self.staged(name), os.path.join(self.directory, name))
        stats_name = self.stage_json(os.path.basename(self.stats_path), stats)
        os.replace(self.staged(stats_name), self.stats_path)
        shutil.rmtree(self.staging)
        return stats

    def abort(self, keep_parts: bool = True) -> None:
        """Remove what this run staged, keeping the input files it finished (if any) for the rerun."""
        parts = os.path.join(self.staging, FileParts.NAME)
        if keep_parts and os.path.isdir(parts) and any(FileParts.is_part(name) for name in os.listdir(parts)):
            for name in os.listdir(self.staging):
                if name != FileParts.NAME:
                    os.remove(os.path.join(self.staging, name))
        else:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _read_stats(self) -> dict | None:
        try:
            with open(self.stats_path) as file:
                stats = json.load(file)
        except (OSError, ValueError):
            return None
        return stats if isinstance(stats, dict) else None

    def _own_paths(self) -> list[str]:
        """The files named after this set's prefixes that only a run of this set may replace
        (a companion's own stats file included: it belonged to another run)."""
        paths = [self.prefix + suffix for suffix in (".bin", ".idx", ".blend.json")]
        suffixes = (".bin", ".idx", ".blend.json", ".stats.json")
        return paths + [prefix + suffix for prefix in self.companions for suffix in suffixes]

    def _files_intact(self, stats: dict) -> bool:
        return all(
            os.path.exists(path := os.path.join(self.directory, name)) and os.path.getsize(path) == size
            for name, size in stats.get("files", {}).items()
        )

    def _clear(self, stats: dict | None, keep_parts: bool) -> None:
        """Remove the marker first, so that a run killed from here on leaves nothing finished."""
        if os.path.exists(self.stats_path):
            os.remove(self.stats_path)
        names = list((stats or {}).get("files", {})) + self._own_paths()
        for name in names:
            path = os.path.join(self.directory, os.path.basename(name))
            if os.path.exists(path):
                os.remove(path)
        if not keep_parts:
            shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging, exist_ok=True)


class FileParts:
    """The input files an unfinished run has finished: `P.incomplete/parts/<key>/` holds one
    file's datasets (one per domain, named 0, 1, ...) and `part.json`, its record. A part is
    written under `<key>.writing/` and renamed into place whole, so one that exists is complete.
    `settings.json` says which settings made them; parts of other settings are removed."""

    NAME = "parts"

    def __init__(self, directory: str, settings: dict):
        self.directory = directory
        settings_path = os.path.join(directory, "settings.json")
        try:
            with open(settings_path) as file:
                same = json.load(file) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(directory, ignore_errors=True)
            os.makedirs(directory)
            write_text_atomically(settings_path, json.dumps(settings, indent=2) + "\n")

    @staticmethod
    def is_part(name: str) -> bool:
        return not name.endswith((".writing", ".json"))

    def path(self, identity: list) -> str:
        return os.path.join(self.directory, hashlib.sha1(identity[0].encode()).hexdigest()[:24])

    def record(self, identity: list) -> dict | None:
        """The record of the file's part, if the file is finished and unchanged since."""
        try:
            with open(os.path.join(self.path(identity), "part.json")) as file:
                part = json.load(file)
        except (OSError, ValueError):
            return None
        return part if part.get("record", {}).get("input") == identity else None

    def start(self, identity: list) -> str:
        """An empty folder to write the file's part in."""
        writing = self.path(identity) + ".writing"
        shutil.rmtree(writing, ignore_errors=True)
        os.makedirs(writing)
        return writing

    def finish(self, identity: list, part: dict) -> None:
        writing = self.path(identity) + ".writing"
        write_text_atomically(os.path.join(writing, "part.json"), json.dumps(part) + "\n")
        shutil.rmtree(self.path(identity), ignore_errors=True)
        os.replace(writing, self.path(identity))

    def discard(self, identity: list) -> None:
        shutil.rmtree(self.path(identity) + ".writing", ignore_errors=True)
