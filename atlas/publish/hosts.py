"""The static hosts an atlas is published on, their documented limits, and the check of a site against them.

A host is looked up by name in ``HOSTS``; adding one is adding an entry. ``kind`` says how
``atlas publish --to`` delivers a site there: ``git`` commits it to a branch and pushes it,
``command`` prints the exact command of the host's own maintained tool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GB = 10**9
MiB = 2**20


@dataclass(frozen=True)
class Host:
    name: str
    kind: str                    # "git" or "command"
    max_bytes: int | None        # the whole published site
    max_files: int | None
    max_per_folder: int | None   # entries (files and folders) directly inside one folder
    max_file_bytes: int | None
    branch: str = ""             # the branch a git host serves the site from
    note: str = ""               # where the limits come from


HOSTS = {h.name: h for h in (
    Host("github-pages", "git", 1 * GB, None, None, 100 * MiB, branch="gh-pages",
         note="GitHub Pages: published site at most 1 GB; GitHub refuses files over 100 MiB in a push"),
    Host("huggingface", "git", 1 * GB, 100_000, 10_000, 10 * 10**6, branch="main",
         note="Hugging Face Spaces: 1 GB repository, fewer than 100,000 files, fewer than 10,000 in one folder; "
              "a plain git push refuses files over 10 MB (they need Git LFS)"),
    Host("gitlab-pages", "git", 1 * GB, None, None, None, branch="pages",
         note="GitLab Pages: 1 GB site"),
    Host("cloudflare-pages", "command", None, 20_000, None, 25 * MiB,
         note="Cloudflare Pages, free plan: 20,000 files, 25 MiB per file"),
    Host("cloudflare-pages-paid", "command", None, 100_000, None, 25 * MiB,
         note="Cloudflare Pages, paid plans: 100,000 files, 25 MiB per file"),
    Host("object-storage", "command", None, None, None, None,
         note="S3, R2, GCS: no practical limit"),
)}


def scan(site: Path) -> dict:
    """Bytes, files, the fullest folder and the largest file of ``site`` (one walk)."""
    total = files = 0
    fullest, fullest_n = ".", 0
    largest, largest_bytes = "", 0
    big_folders: list[tuple[str, int]] = []
    big_files: list[tuple[str, int]] = []
    for root, dirs, names in os.walk(site):
        rel = Path(root).relative_to(site).as_posix()
        entries = len(dirs) + len(names)
        big_folders.append((rel, entries))
        if entries > fullest_n:
            fullest, fullest_n = rel, entries
        for name in names:
            size = os.lstat(os.path.join(root, name)).st_size
            total += size
            files += 1
            big_files.append((f"{rel}/{name}" if rel != "." else name, size))
            if size > largest_bytes:
                largest, largest_bytes = big_files[-1]
    return {"bytes": total, "files": files, "fullest_folder": fullest, "fullest_entries": fullest_n,
            "largest_file": largest, "largest_bytes": largest_bytes, "folders": big_folders, "all_files": big_files}


def problems(stats: dict, host: Host) -> list[str]:
    """Every limit of ``host`` that a site with ``stats`` (from ``scan``) breaks, each naming what breaks it."""
    out = []
    if host.max_bytes is not None and stats["bytes"] > host.max_bytes:
        out.append(f"{stats['bytes']:,} bytes in all, over {host.name}'s {host.max_bytes:,}")
    if host.max_files is not None and stats["files"] > host.max_files:
        out.append(f"{stats['files']:,} files, over {host.name}'s {host.max_files:,}")
    if host.max_per_folder is not None:
        for folder, n in sorted(stats["folders"]):
            if n > host.max_per_folder:
                out.append(f"folder {folder}/ holds {n:,} entries, over {host.name}'s {host.max_per_folder:,} per folder")
    if host.max_file_bytes is not None:
        for path, size in sorted(stats["all_files"]):
            if size > host.max_file_bytes:
                out.append(f"file {path} is {size:,} bytes, over {host.name}'s {host.max_file_bytes:,} per file")
    return out
