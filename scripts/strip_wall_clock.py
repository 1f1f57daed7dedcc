"""Remove the wall-clock figures from result folders made before the cost axis (issue 24).

Those runs logged no ``val/cost_s`` and were timed on shared cores, where wall-clock varies 2x between runs of one
config; their run directories are gone, so the tables cannot be regenerated. Today's ``siftguide.analysis.compare`` prints
such runs on the steps axis only; this makes the published folders say the same:
  - ``table.csv``: the ``time_to_target_s``, ``total_time_s`` and ``time_ratio`` columns dropped;
  - ``table.md``: the "time to target (s)" and "time ratio" columns dropped;
  - ``verdict.md``: "and 0.37x its training time" dropped;
  - ``curves.png``: the right-hand (wall-clock) panel blanked with a note.
Folders whose table has cost data are left alone. Idempotent.

    python scripts/strip_wall_clock.py docs/results
"""
import re
import sys
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

TIME_COLS = ["time_to_target_s", "total_time_s", "time_ratio"]
MD_COLS = {"time to target (s)", "time ratio"}
PANEL_NOTE = ("wall-clock panel removed: these runs shared their cores\n(wall-clock not comparable) and predate "
              "the cost axis.\nSee docs/results/README.md")


def strip_table_md(text: str) -> str:
    out, drop = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            if drop is None:
                drop = [i for i, c in enumerate(cells) if c.strip() in MD_COLS]
            cells = [c for i, c in enumerate(cells) if i not in drop]
            line = "|" + "|".join(cells) + "|"
        else:
            drop = None  # a new table may follow
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def blank_wall_clock_panel(png: Path) -> None:
    im = Image.open(png).convert("RGB")
    w, h = im.size
    if w != 1560:  # two 6.5-inch panels at 120 dpi; another layout is not ours to guess
        raise SystemExit(f"{png}: unexpected width {w}; blank it by hand")
    base = 576  # 4.8 inches of plot height; below it the legend
    draw = ImageDraw.Draw(im)
    draw.rectangle([785, 40, w - 1, base], fill="white")
    font = ImageFont.load_default(size=18)
    draw.multiline_text((820, base // 2 - 40), PANEL_NOTE, fill="black", spacing=8, font=font)
    im.save(png)


def strip_folder(d: Path) -> bool:
    csv = d / "table.csv"
    df = pd.read_csv(csv)
    if any(c.startswith("cost") or "cost_" in c for c in df.columns):
        return False
    present = [c for c in TIME_COLS if c in df.columns]
    if not present:
        return False
    df.drop(columns=present).to_csv(csv, index=False)
    if (d / "table.md").exists():
        (d / "table.md").write_text(strip_table_md((d / "table.md").read_text()))
    if (d / "verdict.md").exists():
        v = (d / "verdict.md").read_text()
        (d / "verdict.md").write_text(re.sub(r" and [0-9.]+x its training time", "", v))
    if (d / "curves.png").exists():
        blank_wall_clock_panel(d / "curves.png")
    return True


def main(root: str) -> None:
    for csv in sorted(Path(root).rglob("table.csv")):
        if strip_folder(csv.parent):
            print(f"stripped {csv.parent}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
