"""Per-epoch metrics as a table: ``metrics.csv`` in the run directory, one row per epoch, written
and flushed as each epoch ends, for spreadsheets and ``pandas.read_csv``.

Columns: ``epoch`` (numbered from 1, as in events and on the console), ``global_step``, then
the epoch's metrics in the order the first epoch reported them. A metric that first appears later
widens the table: the file is rewritten once with the new column, blank in earlier rows. A
resumed run appends to the file; rows of epochs it is about to redo (because it resumed from an
earlier checkpoint than the last row) are dropped first, so each epoch keeps exactly one row.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from minitrain import PluginConfig, hookimpl
from minitrain.engine.files import write_atomic


class CsvLog:
    enabled_by_default = True
    role = "observer"
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        filename: str = "metrics.csv"

    def __init__(self, config: Config):
        self.config = config
        self.path: Path | None = None
        self.fields: list[str] | None = None

    @hookimpl
    def on_fit_start(self, event) -> None:
        self.path = Path(event.run_dir) / self.config.filename if event.run_dir else None
        self.fields = None
        if self.path is None or not self.path.is_file() or not self.path.stat().st_size:
            return
        self.fields, rows = self._read()
        kept = [row for row in rows if not _redone(row, event.start_epoch)]
        if len(kept) < len(rows):
            self._rewrite(kept)

    @hookimpl
    def on_epoch_end(self, event) -> None:
        if self.path is None:
            return
        row = {"epoch": event.epoch, "global_step": event.global_step, **event.metrics}
        if self.fields is None:
            self.fields = list(row)
            self._rewrite([])
        elif any(key not in self.fields for key in row):
            rows = self._read()[1]
            self.fields += [key for key in row if key not in self.fields]
            self._rewrite(rows)
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, self.fields, restval="").writerow(row)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        assert self.path is not None  # called only with a run directory
        with open(self.path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Header and ``rows`` into a new file that then replaces the old one in one step: a crash
        leaves the old table or the new one."""
        assert self.path is not None and self.fields is not None  # called only with both known
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
        write_atomic(self.path, lambda file: file.write(data), what="metrics table")


def _redone(row: dict[str, str], start_epoch: int) -> bool:
    """Whether the row is of ``start_epoch`` or later, which the resumed run (re)does."""
    epoch = row.get("epoch") or ""
    return epoch.isdigit() and int(epoch) >= start_epoch
