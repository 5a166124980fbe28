"""Publishing a site to a git remote: commit it to a branch and push it.

The commit is made in a git directory of the atlas's own (``DIR/.publish/<host>.git``)
whose work tree is ``DIR/site``, so the site is never copied, and whose index keeps the
files' stat data between runs, so a rerun hashes only the files that changed. The branch's
current head on the remote is fetched first and becomes the new commit's parent: the push
is a fast-forward and sends only the objects the remote lacks. A publish that stops half
way (Ctrl-C, a dropped connection) is resumed by running it again: what was staged stays
staged, and the push starts over from the objects the remote already has.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tqdm.auto import tqdm

from atlas.errors import AtlasError

CHUNK = 2000                      # paths staged per git call; the progress bar moves per chunk
AUTHOR = {"GIT_AUTHOR_NAME": "atlas", "GIT_AUTHOR_EMAIL": "atlas@localhost",
          "GIT_COMMITTER_NAME": "atlas", "GIT_COMMITTER_EMAIL": "atlas@localhost"}


def _git(git_dir: Path, site: Path, *args: str, stdin: str | None = None, check: bool = True,
         env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", f"--git-dir={git_dir}", f"--work-tree={site}", *args], input=stdin,
                          capture_output=True, text=True, env={**os.environ, **AUTHOR, **(env or {})})
    if check and proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise AtlasError(f"git {args[0]} failed: {last}")
    return proc


def _site_files(site: Path) -> list[str]:
    out = []
    for root, _, names in os.walk(site):
        rel = os.path.relpath(root, site)
        out.extend(name if rel == "." else f"{rel}/{name}" for name in names)
    return sorted(out)


def push_site(site: Path, git_dir: Path, remote: str, branch: str, message: str, extra: dict[str, bytes],
              progress: bool = True) -> dict:
    """Commit ``site`` (plus ``extra`` files, name -> bytes) onto ``branch`` of ``remote`` and push it.

    Returns the commit, whether anything was pushed, and how many paths changed.
    """
    try:
        subprocess.run(["git", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise AtlasError("publishing to a git host needs git on PATH") from None
    if not git_dir.is_dir():
        git_dir.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "--bare", "-q", str(git_dir)], check=True, capture_output=True)
        _git(git_dir, site, "config", "core.bare", "false")
    # The remote's branch, if it has one, is the parent: the push then sends only what changed.
    fetched = _git(git_dir, site, "fetch", "--quiet", remote, f"+refs/heads/{branch}:refs/remotes/target/{branch}",
                   check=False)
    parent = None
    if fetched.returncode == 0:
        parent = _git(git_dir, site, "rev-parse", f"refs/remotes/target/{branch}").stdout.strip()
    elif "couldn't find remote ref" not in fetched.stderr.lower():
        last = (fetched.stderr.strip() or f"exit code {fetched.returncode}").splitlines()[-1]
        raise AtlasError(f"cannot reach {remote}: {last}")

    files = _site_files(site)
    with tqdm(total=len(files), desc="stage", unit="file", disable=not progress) as bar:
        for i in range(0, len(files), CHUNK):
            chunk = files[i:i + CHUNK]
            _git(git_dir, site, "add", "--pathspec-from-file=-", "--pathspec-file-nul", "-f",
                 stdin="\0".join(chunk), env={"GIT_LITERAL_PATHSPECS": "1"})
            bar.update(len(chunk))
    _git(git_dir, site, "add", "-A", "-f", ".")          # files deleted since the last publish
    for name, data in extra.items():
        blob = subprocess.run(["git", f"--git-dir={git_dir}", "hash-object", "-w", "--stdin"], input=data,
                              capture_output=True, check=True).stdout.decode().strip()
        _git(git_dir, site, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
    tree = _git(git_dir, site, "write-tree").stdout.strip()
    if parent and _git(git_dir, site, "rev-parse", f"{parent}^{{tree}}").stdout.strip() == tree:
        return {"commit": parent, "pushed": False, "changed": 0}
    changed = len(files) + len(extra)
    if parent:
        diff = _git(git_dir, site, "diff-tree", "-r", "--name-only", "--no-commit-id", parent, tree).stdout
        changed = len(diff.splitlines())
    commit = _git(git_dir, site, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message).stdout.strip()
    proc = subprocess.run(["git", f"--git-dir={git_dir}", "push", *(["--progress"] if progress else ["--quiet"]),
                           remote, f"{commit}:refs/heads/{branch}"], env={**os.environ, **AUTHOR},
                          stderr=None if progress else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = ((proc.stderr or "").strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise AtlasError(f"git push to {remote} failed ({last}); run the same command again to resume")
    return {"commit": commit, "pushed": True, "changed": changed}
