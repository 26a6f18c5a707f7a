"""A workflow's store as one self-contained HTML page: timeline, key tree, runs, problems.

Built from metadata records and run records only: nothing is unpickled, so a
report of any store is as safe as ``ls``. The page has no scripts and no
external resources (inline CSS and SVG): it opens offline, from a mail
attachment or a cluster's scratch folder, and hovering a bar shows its
details through SVG ``<title>`` tooltips.

A store of 100,000 entries stays fast: in each lane, steps narrower than one
pixel that fall in the same pixel column are drawn as one aggregate bar
(``class="bar agg"``, ``data-count`` steps), so the page holds at most a few
thousand shapes per lane whatever the store's size.
"""

from __future__ import annotations

import bisect
import html
import itertools
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ._display import MAX_TIME, count, format_duration, format_size, number, printable, when
from ._runs import mask_argv
from .stores._base import clean_run
from .stores._fs import file_kind, replace_file

__all__ = ["render_report", "write_report", "Step", "steps_from_metas", "lane_of", "stale_judgements", "stale_by"]

#: Width of the timeline in SVG user units; the page scales it to the window.
WIDTH = 1200.0
ROW_HEIGHT = 10.0  # one row of bars; a lane has a row per step running side by side
MAX_ROWS = 8  # rows per lane; more steps side by side than that overlap
LANE_GAP = 4.0
LABEL_WIDTH = 150.0
#: Colours of runs, by order of their start (colour-blind-safe palette).
PALETTE = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#332288",
           "#117733", "#882255")
NO_RUN_COLOUR = "#999999"
#: Idle gaps longer than this share of the active time, and than GAP_MIN
#: seconds, are cut out of the axis (a failed run on Monday and its
#: resumption on Wednesday fit one page).
GAP_SHARE = 0.05
GAP_MIN = 60.0
GAP_WIDTH = 24.0  # units drawn for a cut gap
MAX_TREE_CHILDREN = 200
MAX_TREE_DEPTH = 6
MAX_LISTED = 2000  # stale and damaged entries listed before "... and N more"


@dataclass
class Step:
    """One saved step as drawn on the timeline."""

    key: str
    start: float
    end: float
    run: str | None
    meta: dict[str, Any]


def lane_of(key: str) -> str:
    """The lane of a key: its first path component (``iters-001/train/m-0`` -> ``iters-001``)."""
    head, sep, _ = key.partition("/")
    return head if sep else "(top level)"


def steps_from_metas(
    metas: Iterable[dict[str, Any]],
) -> tuple[list[Step], list[dict[str, Any]], list[dict[str, Any]]]:
    """From metadata: timeline steps, damaged records, and intact records without times."""
    steps: list[Step] = []
    damaged: list[dict[str, Any]] = []
    untimed: list[dict[str, Any]] = []
    for meta in metas:
        if "damaged" in meta:
            damaged.append(meta)
            continue
        # Any value may be in a record: only a time from 1970 to 9999 is drawn.
        end = number(meta.get("created"), high=MAX_TIME)
        if end is None:
            untimed.append(meta)  # a reference-format entry: no times recorded (or none usable)
            continue
        dur = number(meta.get("duration"), high=end) or 0.0
        run = meta.get("run")
        steps.append(Step(str(meta["key"]), end - dur, end, run if isinstance(run, str) else None, meta))
    return steps, damaged, untimed


# -- the time axis ------------------------------------------------------------
class _Axis:
    """Maps times to x, cutting long idle gaps out of the axis."""

    def __init__(self, steps: Sequence[Step], width: float) -> None:
        spans = sorted((s.start, s.end) for s in steps)
        merged: list[list[float]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        active = sum(b - a for a, b in merged) or 1.0
        # Blocks of time drawn to scale, separated by the long gaps that are cut.
        blocks: list[list[float]] = []
        for a, b in merged:
            if blocks and a - blocks[-1][1] <= max(GAP_SHARE * active, GAP_MIN):
                blocks[-1][1] = b
            else:
                blocks.append([a, b])
        drawn = sum(b - a for a, b in blocks) or 1.0
        self.scale = max(width - (len(blocks) - 1) * GAP_WIDTH, width * 0.5) / drawn
        self.starts: list[float] = []  # start time of each block
        self.xs: list[float] = []  # its x
        self.cuts: list[tuple[float, float, float]] = []  # (x, width, seconds) of cut gaps
        x = 0.0
        for i, (a, b) in enumerate(blocks):
            if i:
                self.cuts.append((x, GAP_WIDTH, a - blocks[i - 1][1]))
                x += GAP_WIDTH
            self.starts.append(a)
            self.xs.append(x)
            x += (b - a) * self.scale
        self.width = x

    def x(self, t: float) -> float:
        i = max(bisect.bisect_right(self.starts, t) - 1, 0)
        return self.xs[i] + (t - self.starts[i]) * self.scale


# -- pieces of the page -----------------------------------------------------------
def _e(text: object) -> str:
    """Text from a store for the page: ``printable`` (as on the terminal), then HTML-escaped."""
    return html.escape(printable(text), quote=True)


_when = when


def _bar_title(step: Step) -> str:
    m = step.meta
    # Each field escaped on its own: the lines are the tooltip's, never the record's.
    lines = [
        printable(step.key),
        f"function: {printable(m.get('fn_name', '-'))}",
        f"call site: {printable(m.get('call_site', '-'))}",
        f"duration: {format_duration(step.end - step.start)}",
        f"size: {format_size(m.get('size'))}",
        f"host: {printable(m.get('host', '-'))}",
        f"saved: {_when(step.end)}",
    ]
    if step.run:
        lines.append(f"run: {printable(step.run)}")
    return "\n".join(lines)


def _timeline(steps: list[Step], colours: dict[str, str]) -> str:
    if not steps:
        return "<p>No timed steps in this store.</p>"
    axis = _Axis(steps, WIDTH)
    lanes: dict[str, list[Step]] = {}
    for s in steps:
        lanes.setdefault(lane_of(s.key), []).append(s)
    rows = {name: _rows(lanes[name], axis) for name in sorted(lanes)}
    top = 4.0  # room for the first lane's label
    height = top + ROW_HEIGHT * sum(len(r) for r in rows.values()) + LANE_GAP * len(rows) + 24
    out = [f'<svg class="timeline" viewBox="0 0 {LABEL_WIDTH + axis.width + 4:.1f} {height:.1f}" '
           f'width="100%" role="img" aria-label="timeline of saved steps">']
    for x, w, secs in axis.cuts:
        out.append(f'<rect class="cut" x="{LABEL_WIDTH + x:.2f}" y="0" width="{w:.2f}" height="{height - 24:.1f}">'
                   f"<title>{_e(format_duration(secs))} without saved steps (cut out)</title></rect>")
    y = top
    for name, lane in rows.items():
        out.append(f'<text class="lane" x="{LABEL_WIDTH - 6:.1f}" y="{y + ROW_HEIGHT:.1f}">{_e(name)}</text>')
        for row in lane:
            out.extend(_row_bars(row, y, colours))
            y += ROW_HEIGHT
        y += LANE_GAP
        out.append(f'<line class="sep" x1="0" x2="{LABEL_WIDTH + axis.width:.1f}" y1="{y - LANE_GAP / 2:.1f}" '
                   f'y2="{y - LANE_GAP / 2:.1f}"/>')
    t0 = min(s.start for s in steps)
    t1 = max(s.end for s in steps)
    out.append(f'<text class="axis" x="{LABEL_WIDTH:.1f}" y="{height - 6:.1f}">{_e(_when(t0))}</text>')
    out.append(f'<text class="axis end" x="{LABEL_WIDTH + axis.width:.1f}" y="{height - 6:.1f}">{_e(_when(t1))}</text>')
    out.append("</svg>")
    return "\n".join(out)


_Placed = tuple[float, float, Step]


def _rows(steps: list[Step], axis: _Axis) -> list[list[_Placed]]:
    """Steps of one lane placed in rows so that steps running side by side do not hide each other.

    Greedy by start: each step goes to the first row free at its start (in
    pixels); past MAX_ROWS rows, to the row that frees first, overlapping.
    """
    rows: list[list[_Placed]] = []
    ends: list[float] = []
    for x0, x1, s in sorted(((axis.x(s.start), axis.x(s.end), s) for s in steps), key=lambda p: p[0]):
        free = next((i for i, end in enumerate(ends) if end <= x0), None)
        if free is None:
            if len(rows) < MAX_ROWS:
                rows.append([])
                ends.append(0.0)
                free = len(rows) - 1
            else:
                free = min(range(len(ends)), key=ends.__getitem__)
        rows[free].append((x0, x1, s))
        ends[free] = max(ends[free], x1)
    return rows


def _row_bars(placed: list[_Placed], y: float, colours: dict[str, str]) -> list[str]:
    """One rect per step, except where several sub-pixel steps share a pixel column."""
    thin: dict[int, list[_Placed]] = {}
    wide: list[_Placed] = []
    for x0, x1, s in placed:
        if x1 - x0 >= 1.0:
            wide.append((x0, x1, s))
        else:
            thin.setdefault(int(x0), []).append((x0, x1, s))
    out: list[str] = []
    h = ROW_HEIGHT - 3
    for x0, x1, s in wide:
        out.append(_rect(x0, max(x1 - x0, 1.0), y, h, colours.get(s.run or "", NO_RUN_COLOUR),
                         f'class="bar" data-key="{_e(s.key)}"', _bar_title(s)))
    for col, group in sorted(thin.items()):
        if len(group) == 1:
            x0, _, s = group[0]
            out.append(_rect(x0, 1.0, y, h, colours.get(s.run or "", NO_RUN_COLOUR),
                             f'class="bar" data-key="{_e(s.key)}"', _bar_title(s)))
            continue
        total = sum(s.end - s.start for _, _, s in group)
        runs = {s.run for _, _, s in group}
        colour = colours.get(next(iter(runs)) or "", NO_RUN_COLOUR) if len(runs) == 1 else NO_RUN_COLOUR
        keys = [printable(s.key) for _, _, s in group]
        title = (f"{len(group)} steps in this pixel, {format_duration(total)} in all\n"
                 + "\n".join(keys[:5]) + ("\n..." if len(keys) > 5 else ""))
        out.append(_rect(float(col), 1.0, y, h, colour, f'class="bar agg" data-count="{len(group)}"', title))
    return out


def _rect(x: float, w: float, y: float, h: float, colour: str, attrs: str, title: str) -> str:
    return (f'<rect {attrs} x="{LABEL_WIDTH + x:.2f}" y="{y + 1.5:.1f}" width="{w:.2f}" height="{h:.1f}" '
            f'fill="{colour}"><title>{html.escape(title)}</title></rect>')  # title: fields already printable


@dataclass
class _Node:
    count: int = 0
    size: int = 0
    duration: float = 0.0
    children: dict[str, _Node] = field(default_factory=dict)


def _key_tree(steps: list[Step], untimed: list[dict[str, Any]]) -> str:
    root = _Node()
    for key, size, dur in [(s.key, s.meta.get("size"), s.end - s.start) for s in steps] + [
        (str(m["key"]), m.get("size"), 0.0) for m in untimed
    ]:
        size = count(size) or 0
        node = root
        for part in key.split("/")[:MAX_TREE_DEPTH]:
            node = node.children.setdefault(part, _Node())
            node.count += 1
            node.size += size
            node.duration += dur
    if not root.children:
        return "<p>The store is empty.</p>"
    out = ['<table class="tree"><tr><th>key</th><th>entries</th><th>size</th><th>time to compute</th></tr>']
    # Depth first; a str on the stack is an already rendered "... and N more" row.
    stack: list[tuple[int, str, _Node] | str] = [(0, n, c) for n, c in sorted(root.children.items(), reverse=True)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        level, name, node = item
        out.append(f'<tr><td style="padding-left:{level * 1.2:.1f}em">{_e(name)}</td>'
                   f"<td>{node.count}</td><td>{_e(format_size(node.size))}</td>"
                   f"<td>{_e(format_duration(node.duration))}</td></tr>")
        kids = sorted(node.children.items())
        if len(kids) > MAX_TREE_CHILDREN:
            rest = kids[MAX_TREE_CHILDREN:]
            kids = kids[:MAX_TREE_CHILDREN]
            stack.append(f'<tr><td style="padding-left:{(level + 1) * 1.2:.1f}em">... and {len(rest)} more</td>'
                         f"<td>{sum(n.count for _, n in rest)}</td><td></td><td></td></tr>")
        stack.extend((level + 1, n, c) for n, c in reversed(kids))
    out.append("</table>")
    return "\n".join(out)


def _runs_table(runs: list[dict[str, Any]], colours: dict[str, str]) -> str:
    if not runs:
        return "<p>No runs recorded (a store written before runs were recorded, or by the reference).</p>"
    head = ("<tr><th></th><th>run</th><th>started</th><th>lasted</th><th>host</th><th>pid</th><th>user</th>"
            "<th>steps run</th><th>hits</th><th>stale</th><th>reruns</th><th>failed saves</th>"
            "<th>time saved by hits</th><th>command</th></tr>")
    out = ['<table class="runs">', head]
    for r in runs:
        rid = str(r.get("id", "?"))
        started, last = r.get("started"), r.get("last")
        lasted = last - started if started is not None and last is not None and last >= started else None
        out.append(
            f'<tr data-run="{_e(rid)}"><td><span class="swatch" style="background:{colours.get(rid, NO_RUN_COLOUR)}">'
            f"</span></td><td>{_e(rid)}</td><td>{_e(_when(started))}</td><td>{_e(format_duration(lasted))}</td>"
            f"<td>{_e(_or_dash(r.get('host')))}</td><td>{_e(_or_dash(r.get('pid')))}</td>"
            f"<td>{_e(_or_dash(r.get('user')))}</td><td>{_e(_or_dash(r.get('steps_run')))}</td>"
            f"<td>{_e(_or_dash(r.get('hits')))}</td><td>{_e(_or_dash(r.get('stale')))}</td>"
            f"<td>{_e(_or_dash(r.get('reruns')))}</td><td>{_e(_or_dash(r.get('save_failures')))}</td>"
            f"<td>{_e(format_duration(r.get('saved_seconds')))}</td>"
            f"<td class=\"cmd\">{_e(command_line(r.get('argv')))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _or_dash(value: object) -> object:
    return "-" if value is None else value


def command_line(argv: object) -> str:
    """A run's command line as shown (``runs``, the report): secrets masked, '-' when none was recorded.

    Masked again here: records written before masking hold the line verbatim.
    """
    if not isinstance(argv, list) or not argv:
        return "-"
    return " ".join(mask_argv(argv))


def stale_judgements(runs: Iterable[dict[str, Any]]) -> dict[str, tuple[float, str]]:
    """Every key some run judged stale: (the latest start of such a run, its id).

    A run record says which keys it judged stale, not when; its start is the
    earliest the judgement can have been made. A run without a usable start
    time counts as judging last (its entries stay listed until replaced or
    removed): listing too much is safer than hiding a stale result.
    """
    judged: dict[str, tuple[float, str]] = {}
    for r in runs:
        clean = clean_run(r)
        if clean is None:
            continue
        started = clean["started"] if clean["started"] is not None else float("inf")
        for key in clean["stale_keys"]:
            if key not in judged or started >= judged[key][0]:
                judged[key] = (started, clean["id"])
    return judged


def stale_by(judged: dict[str, tuple[float, str]], meta: dict[str, Any]) -> str | None:
    """The id of the run that makes this entry stale now, or None.

    Stale now: a run that started after the entry was saved judged it stale,
    and the entry was not replaced since (a replacement is saved after the
    run that judged the old one started: a rerun, or ``rm`` and a new run).
    A removed entry has no record to ask about. An entry without a saved
    time (a reference-format one) cannot be shown to be newer: it stays.
    """
    hit = judged.get(str(meta.get("key")))
    if hit is None or "damaged" in meta:
        return None
    created = number(meta.get("created"), high=MAX_TIME)
    return hit[1] if created is None or created < hit[0] else None


def _problems(runs: list[dict[str, Any]], metas: Iterable[dict[str, Any]], damaged: list[dict[str, Any]]) -> str:
    out = []
    judged = stale_judgements(runs)
    stale: dict[str, str] = {}
    if judged:
        for meta in metas:
            rid = stale_by(judged, meta)
            if rid is not None:
                stale[str(meta["key"])] = rid
    if stale:
        out.append(f"<h3>Stale entries ({len(stale)})</h3><p>Saved results that a later run found made "
                   "with other arguments or code, and that were not replaced or removed since. Remove one "
                   "with <code>rm KEY</code> to run its step again.</p><ul>")
        for key, rid in sorted(stale.items())[:MAX_LISTED]:
            out.append(f'<li class="stale">{_e(key)} <small>(seen by run {_e(rid)})</small></li>')
        if len(stale) > MAX_LISTED:
            out.append(f"<li>... and {len(stale) - MAX_LISTED} more</li>")
        out.append("</ul>")
    if damaged:
        out.append(f"<h3>Damaged entries ({len(damaged)})</h3><p>Their steps run again when hit; "
                   "<code>verify</code> checks them all and <code>rm KEY</code> removes one.</p><ul>")
        for meta in damaged[:MAX_LISTED]:
            out.append(f'<li class="damaged">{_e(meta["key"])}: {_e(meta.get("damaged"))}</li>')
        if len(damaged) > MAX_LISTED:
            out.append(f"<li>... and {len(damaged) - MAX_LISTED} more</li>")
        out.append("</ul>")
    return "\n".join(out) if out else "<p>No stale or damaged entries known.</p>"


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee;white-space:nowrap}
td:nth-child(n+2){font-variant-numeric:tabular-nums}
.timeline{max-width:100%;height:auto;background:#fafafa;border:1px solid #ddd}
.timeline .lane{font-size:11px;text-anchor:end;fill:#444}
.timeline .axis{font-size:11px;fill:#666}.timeline .axis.end{text-anchor:end}
.timeline .cut{fill:#eee}.timeline .sep{stroke:#e4e4e4;stroke-width:0.5}
.timeline .bar:hover{stroke:#000;stroke-width:1}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px}
.cmd{font-family:monospace;font-size:12px;max-width:40em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.summary span{margin-right:2em}
"""


def render_report(
    location: str,
    metas: Iterable[dict[str, Any]],
    runs: Sequence[dict[str, Any]] = (),
    *,
    title: str | None = None,
    now: float | None = None,
) -> str:
    """The HTML page for one store, from its metadata and run records.

    Parameters:
        location: the store's location, shown in the heading.
        metas: metadata records (``Store.iter_meta()``), damaged ones included.
        runs: run records (``Store.iter_runs()``), oldest first.
    Returns the page as a string (UTF-8 when written).
    """
    steps, damaged, untimed = steps_from_metas(metas)
    # Checked again here (``Store.iter_runs`` did): scripts may pass any records.
    runs = sorted(filter(None, map(clean_run, runs)), key=lambda r: (r["started"] or 0.0, r["id"]))
    colours = {str(r.get("id")): PALETTE[i % len(PALETTE)] for i, r in enumerate(runs)}
    total_size = sum(count(s.meta.get("size")) or 0 for s in steps)
    total_time = sum(s.end - s.start for s in steps)
    saved = sum(r["saved_seconds"] or 0.0 for r in runs)
    heading = title or f"Checkpoints in {location}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(heading)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(heading)}</h1>",
        f'<p class="summary"><span>{len(steps) + len(untimed) + len(damaged)} entries</span>'
        f"<span>{_e(format_size(total_size))}</span>"
        f"<span>{_e(format_duration(total_time))} of computing stored</span>"
        f"<span>{len(runs)} runs</span><span>{_e(format_duration(saved))} saved by hits</span>"
        f"<span>report written {_e(_when(now if now is not None else time.time()))}</span></p>",
        "<h2>Timeline</h2>",
        "<p>Every saved step as a bar from its start to its end, one lane per first key component, "
        "coloured by the run that saved it; steps that ran side by side get rows of their own. Hover a "
        "bar for its details; grey columns are idle time cut out of the axis.</p>",
        _timeline(steps, colours),
        "<h2>Runs</h2>",
        _runs_table(list(runs), colours),
        "<h2>Stale and damaged entries</h2>",
        _problems(list(runs), itertools.chain((s.meta for s in steps), untimed), damaged),
        "<h2>Keys</h2>",
        _key_tree(steps, untimed),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(
    out: str, location: str, metas: Iterable[dict[str, Any]], runs: Sequence[dict[str, Any]] = (),
) -> None:
    """Render the page and write it to ``out`` whole or not at all (temp file, then rename).

    ``out`` must be a new name or a regular file, which is replaced. A link,
    FIFO, device or folder there raises ValueError and is left alone: a
    rename would put the page in the place of a device node or a FIFO that
    something else relies on, and following a link writes where someone
    else chose.
    """
    if not out:
        raise ValueError("the report needs a file name (OUT.html), not an empty one")
    path = os.path.abspath(out)
    _check_target(path)
    page = render_report(location, metas, runs)
    _check_target(path)  # again, right before the rename: rendering a big store takes a while
    replace_file(path, page.encode("utf-8"), durable=False)


def _check_target(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else file_kind(mode)
        raise ValueError(f"{printable(path)} is {kind}; the report is written to a new file or replaces "
                         "a regular one: pick another name")
