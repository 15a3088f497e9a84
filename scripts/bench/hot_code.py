#!/usr/bin/env python3
"""The functions a running daemon keeps executing, for src/hot-code.order (see build.rs).

  hot_code.py sample SECONDS OUT NAME=PID...  record the code pages each daemon touches
  hot_code.py names MAP BINARY TOUCHED NAME...  the functions in those pages, in layout order
  hot_code.py remap FROM_MAP TO_MAP       names (stdin) as another build configuration spells them
  hot_code.py check MAP ORDER             how many of ORDER's names a build has, and their span

MAP is LLD's link map of the build (AWS_PGBOUNCER_LINK_MAP=FILE cargo build --release), which
names every input section with its address, so the build itself may be stripped.

`sample` needs the disk's read-ahead off while the daemons start and run (hot-code-order.sh
does that): a page the kernel reads in around a fault is mapped by fault-around as if touched.
With read-ahead off and the binary's unmapped pages dropped from the page cache every 0.5 s,
only pages the daemons execute are in the cache, so only those become resident.
"""
import collections
import os
import re
import struct
import subprocess
import sys
import time

PAGE = 4096


def sample(seconds, out, daemons):
    pids = dict(daemon.split("=") for daemon in daemons)
    exe = os.readlink(f"/proc/{next(iter(pids.values()))}/exe")
    fd = os.open(exe, os.O_RDONLY)
    touched = collections.defaultdict(set)
    end = time.time() + seconds
    while time.time() < end:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        time.sleep(0.5)
        for name, pid in pids.items():
            for page in present_code_pages(pid, exe):
                touched[page].add(name)
    with open(out, "w") as f:
        f.writelines(f"{page:#x} {','.join(sorted(touched[page]))}\n" for page in sorted(touched))
    print(f"{len(touched) * 4} KiB of code touched", file=sys.stderr)


def present_code_pages(pid, exe):
    """File offsets of the resident pages of `pid`'s executable mappings of `exe`."""
    for line in open(f"/proc/{pid}/maps"):
        fields = line.split()
        if len(fields) < 6 or fields[5] != exe or "x" not in fields[1]:
            continue
        start, stop = (int(x, 16) for x in fields[0].split("-"))
        offset = int(fields[2], 16)
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            pagemap.seek(start // PAGE * 8)
            entries = pagemap.read((stop - start) // PAGE * 8)
        for i in range(len(entries) // 8):
            if struct.unpack_from("<Q", entries, i * 8)[0] >> 63:
                yield offset + i * PAGE


def text_sections(map_file):
    """(address, size, symbols) of every input section of the output section .text. The map's
    last column is indented by depth: output section, input section, symbol."""
    line_format = re.compile(r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+ (\s*)(.*)$")
    sections, in_text = [], False
    for line in open(map_file):
        match = line_format.match(line.rstrip("\n"))
        if not match:
            continue
        address, size = int(match.group(1), 16), int(match.group(2), 16)
        depth, what = len(match.group(3)), match.group(4)
        if depth == 0:
            in_text = what == ".text"
        elif not in_text:
            continue
        elif depth == 8:
            sections.append([address, size, []])
        elif sections:
            sections[-1][2].append(what)
    return sections


def code_segment(binary):
    """(file offset, address) of the binary's executable LOAD segment."""
    out = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD" and "E" in fields[6:-1]:
            return int(fields[1], 16), int(fields[2], 16)
    sys.exit(f"{binary}: no executable segment")


def names(map_file, binary, touched_file, *priority):
    """Functions in touched pages, those of the first daemon in `priority` first, so that its
    hot code is one block: ordered by which daemons touched them (the first's bit highest),
    then as they lay before."""
    offset, address = code_segment(binary)
    pages = {}
    for line in open(touched_file):
        page, who = line.split()
        pages[int(page, 16) - offset + address] = set(who.split(","))
    chosen = []
    for start, size, symbols in text_sections(map_file):
        spanned = range(start & ~(PAGE - 1), start + max(size, 1), PAGE)
        hit = [pages[page] for page in spanned if page in pages]
        # A large function the daemon runs a corner of (AES-GCM's unrolled assembly) would
        # push the hot code apart: it stays where it is.
        if hit and symbols and (size <= 16384 or len(hit) * 2 >= len(spanned)):
            who = set().union(*hit)
            chosen.append((tuple(name not in who for name in priority), start, symbols[0]))
    print("\n".join(dict.fromkeys(name for *_, name in sorted(chosen))))


def normalized(name):
    """A name without what differs between build configurations: crate disambiguators (v0),
    the symbol hash (legacy) and ThinLTO's promotion suffix."""
    name = re.sub(r"\.llvm\.\d+$", "", name)
    name = re.sub(r"17h[0-9a-f]{16}E$", "", name)
    return re.sub(r"Cs[0-9A-Za-z]+_", "Cs_", name)


def remap(from_map, to_map):
    sizes = {s[2][0]: s[1] for s in text_sections(from_map) if s[2]}
    spelled = collections.defaultdict(list)
    for _, size, section_names in text_sections(to_map):
        if section_names:
            spelled[(normalized(section_names[0]), size)].append(section_names[0])
    found = lost = 0
    for name in sys.stdin.read().split():
        # One name may stand for several instances alike in all but their hash: all go
        # first, unless so many that most would be cold.
        candidates = spelled.get((normalized(name), sizes.get(name)), [])
        if 0 < len(candidates) <= 8:
            print("\n".join(candidates))
            found += 1
        else:
            lost += 1
    print(f"remapped {found}, not found {lost}", file=sys.stderr)


def check(map_file, order_file):
    wanted = {line.strip() for line in open(order_file) if line.strip() and line[0] != "#"}
    placed = [(s[0], s[1]) for s in text_sections(map_file) if s[2] and s[2][0] in wanted]
    if not placed:
        sys.exit(f"none of the {len(wanted)} names is in this build")
    start, end = min(a for a, _ in placed), max(a + s for a, s in placed)
    print(f"{len(placed)} of {len(wanted)} names in this build, "
          f"{sum(s for _, s in placed) // 1024} KiB of code, "
          f"placed within {(end - start) // 1024} KiB")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "sample":
        sample(float(args[0]), args[1], args[2:])
    elif command == "names":
        names(*args)
    elif command == "remap":
        remap(*args)
    elif command == "check":
        check(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
